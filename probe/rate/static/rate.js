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
  const images = [document.getElementById("left"), document.getElementById("right")];
  for (const image of images) image.removeAttribute("style");
  images[0].src = base + "/image/" + task.left;
  images[1].src = base + "/image/" + task.right;
  Promise.all(images.map((image) => image.decode().catch(() => null))).then(() => enlargeSmall(images));
  document.getElementById("task").hidden = false;
  setBusy(false);
}

// Images are shown at full resolution; small ones (a tiny test model's 64 px) are enlarged by one whole factor
// for both, pixel for pixel, so the two are always compared at the same scale.
function enlargeSmall(images) {
  const widest = Math.max(...images.map((image) => image.naturalWidth || 0));
  const factor = widest > 0 ? Math.max(1, Math.floor(384 / widest)) : 1;
  if (factor === 1) return;
  for (const image of images) {
    image.style.width = image.naturalWidth * factor + "px";
    image.style.imageRendering = "pixelated";
  }
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
