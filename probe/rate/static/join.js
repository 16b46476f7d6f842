"use strict";
// Open studies: a rater picks a name and is sent to their own link (the same name resumes).
const form = document.getElementById("join");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error");
  const response = await fetch("/join", {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Probe-CSRF": form.dataset.join},
    body: JSON.stringify({name: document.getElementById("name").value}),
  });
  if (!response.ok) {
    error.textContent = "Could not join: " + ((await response.json()).detail || response.status);
    error.hidden = false;
    return;
  }
  window.location.assign((await response.json()).url);
});
