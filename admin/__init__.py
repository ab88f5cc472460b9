"""API Key Wallet: the control plane (admin API, auth, CLI). Imports gateway, never the reverse."""
