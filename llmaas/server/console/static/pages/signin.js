import { ApiError, currentSession, say, start } from "../js/api.js";

const HOME = { customer: "overview", admin: "admin/accounts" };

function destination(role) {
  const next = new URLSearchParams(location.search).get("next") || "";
  const fits = /^[a-z/]+$/.test(next) && next.startsWith("admin/") === (role === "admin");
  return "/console/" + (fits ? next : HOME[role]);
}

start(async () => {
  const form = document.getElementById("signin");
  const keyInput = document.getElementById("api-key");
  // The handler first, then the button and the focus: until then the form cannot be submitted (its button
  // is disabled), so a key typed early never leaves in a native form submission.
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    say("Signing in…");
    const response = await fetch("/console/api/session", {
      method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
      body: JSON.stringify({ api_key: keyInput.value }),
    });
    const body = await response.json().catch(() => null);
    keyInput.value = "";
    if (!response.ok) {
      say(new ApiError(response.status, body).message, true);
      keyInput.focus();
      return;
    }
    location.assign(destination(body.role));
  });
  form.querySelector("button[type=submit]").disabled = false;
  keyInput.focus();
  const session = await currentSession();
  if (session) {
    const note = document.getElementById("signed-in");
    note.hidden = false;
    note.textContent = `Signed in as ${session.role === "admin" ? "the operator" : "account " + session.account}. `;
    const link = document.createElement("a");
    link.href = destination(session.role);
    link.textContent = "Open the console";
    note.append(link);
  }
});
