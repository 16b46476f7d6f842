"use strict";
// The rating page: fetch the next task, show it, post the choice, and only move on once the server has
// committed the vote (its answer carries the next task).
const app = document.getElementById("app");
const base = "/r/" + app.dataset.token;
let task = null;
let busy = false;

function show(state) {
  const {answered, total} = state.progress;
  document.getElementById("bar").style.width = (total ? 100 * answered / total : 0) + "%";
  document.querySelector(".progress").setAttribute("aria-valuenow", String(total ? Math.round(100 * answered / total) : 0));
  document.getElementById("count").textContent = answered + " of " + total + " answered";
  if (state.done) {
    window.location.assign(base + "/done");
    return;
  }
  task = state.task;
  document.getElementById("question").textContent = task.text;
  document.getElementById("prompt").textContent = task.prompt;
  document.getElementById("left").src = base + "/image/" + task.left;
  document.getElementById("right").src = base + "/image/" + task.right;
  document.getElementById("task").hidden = false;
  setBusy(false);
}

function setBusy(value) {
  busy = value;
  for (const id of ["pick-left", "pick-right"]) document.getElementById(id).disabled = value;
}

function fail(message) {
  const error = document.getElementById("error");
  error.textContent = message;
  error.hidden = false;
  setBusy(false);
}

async function load() {
  const response = await fetch(base + "/next", {cache: "no-store"});
  if (!response.ok) return fail("Could not load the next pair (" + response.status + "). Reload the page.");
  show(await response.json());
}

async function choose(choice) {
  if (busy || !task) return;
  setBusy(true);
  try {
    const response = await fetch(base + "/vote", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Probe-CSRF": app.dataset.csrf},
      body: JSON.stringify({pair: task.pair, question: task.question, choice: choice}),
    });
    if (!response.ok) return fail("Your answer was not saved (" + response.status + "). Try again.");
    document.getElementById("error").hidden = true;
    show(await response.json());
  } catch (err) {
    fail("Your answer was not saved (the server did not answer). Try again.");
  }
}

document.getElementById("pick-left").addEventListener("click", () => choose("left"));
document.getElementById("pick-right").addEventListener("click", () => choose("right"));
document.addEventListener("keydown", (event) => {
  if (event.repeat || event.altKey || event.ctrlKey || event.metaKey) return;
  if (event.key === "ArrowLeft" || event.key === "1") { event.preventDefault(); choose("left"); }
  if (event.key === "ArrowRight" || event.key === "2") { event.preventDefault(); choose("right"); }
});
load();
