import { api, say, start } from "../js/api.js";
import { el, table, when } from "../js/format.js";

async function list() {
  const keys = (await api("/console/api/keys")).data;
  const rows = keys.map((k) => {
    const state = k.revoked_at ? `revoked ${when(k.revoked_at)}` : "active";
    const action = k.revoked_at ? "" : el("button", {
      type: "button", class: "danger", "data-key": k.id, "aria-label": `Revoke key ${k.name || k.display_prefix}`,
      onclick: (event) => revoke(event.currentTarget, k),
    }, "Revoke");
    return [k.name || "—", `${k.display_prefix}…`, k.id, when(k.created_at), when(k.expires_at), state, action];
  });
  const columns = [{ label: "Name" }, { label: "Key" }, { label: "Id" }, { label: "Created" }, { label: "Expires" },
    { label: "State" }, { label: "Action" }];
  document.getElementById("keys").replaceChildren(table("Your account's API keys", columns, rows));
}

// Two steps, so that a stray Enter never revokes a key: the first press asks, the second revokes.
async function revoke(button, key) {
  if (!button.dataset.confirm) {
    button.dataset.confirm = "1";
    button.textContent = "Confirm revoke";
    say(`Press "Confirm revoke" to revoke ${key.display_prefix}… for good.`);
    return;
  }
  button.disabled = true;
  await api(`/console/api/keys/${encodeURIComponent(key.id)}/revoke`, { method: "POST" });
  say(`Key ${key.display_prefix}… (${key.id}) is revoked: the API now refuses it.`);
  await list();
}

start(async () => {
  const form = document.getElementById("create");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("key-name").value.trim();
    const days = document.getElementById("key-days").value;
    try {
      const made = await api("/console/api/keys", {
        method: "POST", body: { name: name || null, expires_in_days: days ? Number(days) : null },
      });
      document.getElementById("new-secret").textContent = made.secret;
      document.getElementById("new-key").hidden = false;
      document.getElementById("copy").focus();
      form.reset();
      say(`Created key ${made.display_prefix}… (${made.id}).`);
      await list();
    } catch (error) {
      say(error.message, true);
    }
  });
  document.getElementById("copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(document.getElementById("new-secret").textContent);
      say("Copied.");
    } catch {
      say("This browser refused the clipboard: select the key and copy it by hand.", true);
    }
  });
  await list();
});
