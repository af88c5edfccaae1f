// The one-time login: the token is in the URL's fragment, which no server
// or proxy log ever sees; it is posted once and removed from the address bar.
const status = document.getElementById("login-status");
const token = location.hash.slice(1);
history.replaceState(null, "", "/login");
if (!token) {
  status.textContent = "No login token in this URL.";
} else {
  fetch("/login", {
    method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json" }, body: JSON.stringify({ token }),
  }).then(async (r) => {
    if (r.ok) { location.replace("/runs"); return; }
    const body = await r.json().catch(() => ({}));
    status.textContent = `Not logged in: ${body.error || r.statusText}`;
    status.className = "error";
  });
}
