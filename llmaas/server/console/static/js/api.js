// This server's APIs as the signed-in browser calls them: the session cookie goes by itself (HttpOnly:
// scripts never see it), and every call carries the session's CSRF token in a header.

let csrfToken = null;

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.param = body && body.error ? body.error.param : null;
  }
}

export async function currentSession() {
  const response = await fetch("/console/api/session", { credentials: "same-origin" });
  if (!response.ok) return null;
  const session = await response.json();
  if (!session.role) return null; // not signed in
  csrfToken = session.csrf_token;
  return session;
}

export function goToSignIn() {
  const page = location.pathname.replace(/^\/console\/?/, "");
  location.assign("/console/" + (page ? "?next=" + encodeURIComponent(page) : ""));
}

// fetch() with the session's headers; the Response as it comes (the playground reads it as a stream).
export async function send(path, { method = "GET", body, signal } = {}) {
  if (csrfToken === null && !(await currentSession())) {
    goToSignIn();
    throw new ApiError(401, null);
  }
  const headers = { "x-csrf-token": csrfToken };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, {
    method, headers, signal, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) goToSignIn(); // expired session, or its key was revoked
  return response;
}

// A JSON call: the decoded body, or an ApiError carrying the API's own message.
export async function api(path, options) {
  const response = await send(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== undefined && value !== null) search.set(key, value);
  return search.toString();
}

// The status line under the page title (role=status: screen readers announce it).
export function say(text, bad = false) {
  const line = document.getElementById("status");
  line.textContent = text;
  line.classList.toggle("bad", bad);
}

export function wireSignOut() {
  const button = document.getElementById("sign-out");
  if (!button) return;
  button.addEventListener("click", async () => {
    try { await api("/console/api/session", { method: "DELETE" }); } finally { location.assign("/console/"); }
  });
}

// Runs a page's start-up, reporting a failure on the status line instead of leaving a blank page.
export async function start(main) {
  wireSignOut();
  try { await main(); } catch (error) { say(error.message, true); }
}
