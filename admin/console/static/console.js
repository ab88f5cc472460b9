// Progressive enhancement only: every page works without this file.
"use strict";
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source || !navigator.clipboard) return;
  navigator.clipboard.writeText(source.textContent).then(() => {
    button.textContent = "Copied";
  });
});
document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});
// A page brought back from the browser's back-forward cache was not asked of the server: ask
// again, so a session that ended meanwhile (idle, signed out) shows the sign-in form instead.
window.addEventListener("pageshow", (event) => {
  if (event.persisted) window.location.reload();
});
