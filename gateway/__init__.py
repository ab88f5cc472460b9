"""API Key Wallet: the data plane and the domain core shared by both apps."""
