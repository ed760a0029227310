// The front end of attnscope's trace viewer (ats.view): controls, panels, colour bar and table.
// Python (attnscope/plot/_view.py) owns the state and renders the PNGs; this file only draws what the
// model holds and sends the user's choices back. No network: everything arrives through the model.

const CSS = `
.atv { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--jp-ui-font-color1, #1f2328);
       background: var(--jp-layout-color0, #fff); padding: 6px 2px; }
.atv * { box-sizing: border-box; }
.atv-controls { display: grid; grid-template-columns: max-content minmax(200px, 340px) minmax(120px, max-content);
                gap: 6px 10px; align-items: center; margin-bottom: 8px; }
.atv-controls > .atv-name { font-weight: 600; }
.atv-controls input[type=range] { width: 100%; }
.atv-words { grid-column: 2 / 4; display: flex; flex-wrap: wrap; gap: 4px; }
.atv .atv-chip { border: 1px solid #8c959f; border-radius: 12px; padding: 1px 9px; cursor: pointer; user-select: none;
            background: transparent; color: inherit; font: inherit; }
.atv .atv-chip[aria-pressed=true] { background: #0969da; border-color: #0969da; color: #fff; }
.atv-value { font-variant-numeric: tabular-nums; white-space: nowrap; }
.atv-summary { color: var(--jp-ui-font-color2, #57606a); margin: 2px 0 6px; }
.atv-run { margin: 6px 0 4px; }
.atv-run-label { font-weight: 600; margin-bottom: 3px; }
.atv-run-label .atv-prompt { font-weight: 400; font-style: italic; }
.atv-row { display: flex; flex-wrap: nowrap; gap: 10px; overflow-x: auto; padding-bottom: 2px; }
.atv-panel { margin: 0; flex: 0 0 auto; width: var(--atv-side, 180px); }
.atv-stack { position: relative; width: 100%; background: #000; }
.atv-stack img { display: block; width: 100%; height: auto; image-rendering: auto; }
.atv-stack img.atv-map { position: absolute; left: 0; top: 0; height: 100%; }
.atv-panel figcaption { text-align: center; margin-top: 2px; }
.atv-panel figcaption .atv-mean { font-size: 12px; color: var(--jp-ui-font-color2, #57606a); font-variant-numeric: tabular-nums; }
.atv-colorbar { display: flex; align-items: center; gap: 6px; margin: 8px 0; flex-wrap: wrap; }
.atv-colorbar img { width: 260px; height: 14px; border: 1px solid #8c959f; }
.atv-colorbar .atv-caption { color: var(--jp-ui-font-color2, #57606a); }
.atv-stats { border-collapse: collapse; font-variant-numeric: tabular-nums; margin-top: 4px; }
.atv-stats th, .atv-stats td { border-bottom: 1px solid #d0d7de; padding: 2px 10px; text-align: right; }
.atv-stats th:first-child { text-align: left; font-weight: 400; }
.atv-stats thead th { font-weight: 600; }
.atv-table-caption { color: var(--jp-ui-font-color2, #57606a); margin-top: 8px; }
.atv-hidden { display: none !important; }
`;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Three significant digits, as the table's numbers (_format in _view.py): 0.0130, 0.305, 2.15, 4.20e-4
function number(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  if (value === 0) return "0";
  const size = Math.abs(value);
  return size >= 0.001 && size < 1000 ? value.toPrecision(3) : value.toExponential(2);
}

// A labelled range input over a list of positions: 0 is "all", 1..n the options.
function slider(grid, name, cls) {
  const label = element("span", "atv-name", name);
  const input = element("input", cls);
  input.type = "range";
  input.min = 0;
  input.step = 1;
  input.setAttribute("aria-label", name);
  const value = element("span", "atv-value");
  grid.append(label, input, value);
  return { label, input, value, rows: [label, input, value] };
}

function select(grid, name, cls) {
  const label = element("span", "atv-name", name);
  const input = element("select", cls);
  input.setAttribute("aria-label", name);
  const spacer = element("span");
  grid.append(label, input, spacer);
  return { label, input, rows: [label, input, spacer] };
}

function render({ model, el }) {
  const root = element("div", "atv attnscope-viewer");
  const style = element("style");
  style.textContent = CSS;
  const grid = element("div", "atv-controls");
  const wordsLabel = element("span", "atv-name", "words");
  const words = element("div", "atv-words");
  grid.append(wordsLabel, words);
  const site = slider(grid, "site", "atv-site");
  const step = slider(grid, "step", "atv-step");
  const head = select(grid, "head", "atv-head");
  const sample = select(grid, "sample", "atv-sample");
  const opacity = slider(grid, "map opacity", "atv-opacity");
  opacity.input.max = 100;
  const summary = element("div", "atv-summary");
  const panels = element("div", "atv-panels");
  const bar = element("div", "atv-colorbar");
  const barMin = element("span", "atv-value atv-min");
  const barImage = element("img");
  barImage.alt = "colour scale";
  const barMax = element("span", "atv-value atv-max");
  const barCaption = element("span", "atv-caption",
    "attention on the word's tokens (summed over its tokens; one scale for every panel)");
  bar.append(barMin, barImage, barMax, barCaption);
  const tableCaption = element("div", "atv-table-caption",
    "Dominance of the selection (ats.stats.dominance, heads averaged): shares, entropy, Gini and sink share are " +
    "means over the selected sites and steps");
  const table = element("div", "atv-table");
  root.append(style, grid, summary, panels, bar, tableCaption, table);
  el.appendChild(root);

  const send = (name, value) => {
    model.set(name, value);
    model.save_changes();
  };

  function drawWords() {
    const focused = words.contains(document.activeElement) ? document.activeElement.textContent : null;
    words.replaceChildren();
    const chosen = model.get("words");
    const options = [...model.get("word_options")];
    for (const w of chosen) if (!options.includes(w)) options.push(w);
    for (const w of options) {
      const chip = element("button", "atv-chip", w);
      chip.type = "button";
      chip.setAttribute("aria-pressed", chosen.includes(w) ? "true" : "false");
      chip.addEventListener("click", () => {
        const now = model.get("words");
        const next = now.includes(w) ? now.filter((x) => x !== w) : options.filter((x) => now.includes(x) || x === w);
        if (next.length) send("words", next);
      });
      words.appendChild(chip);
      if (w === focused) chip.focus(); // a keyboard user toggling chips stays on the chip
    }
  }

  function position(options, value) {
    const i = options.indexOf(value);
    return i < 0 ? 0 : i + 1;
  }

  // count: how many the "all" position averages (the steps: those computed, gated steps left out)
  function drawSlider(control, options, labels, name, count) {
    control.input.max = options.length;
    control.input.value = position(options, model.get(name));
    showSlider(control, labels, Number(control.input.value), count);
  }

  function showSlider(control, labels, at, count) {
    control.value.textContent = at === 0 ? `all (mean of ${count})` : labels[at - 1];
    control.input.setAttribute("aria-valuetext", control.value.textContent); // read out, not the position
  }

  function drawSites() {
    drawSlider(site, model.get("site_options"), model.get("site_labels"), "site", model.get("site_options").length);
    site.input.title = model.get("site") === "all" ? "every site" : model.get("site");
  }

  function drawSteps() {
    drawSlider(step, model.get("step_options"), model.get("step_labels"), "step", model.get("step_mean_count"));
  }

  function drawHeads() {
    const count = model.get("head_count");
    head.rows.forEach((n) => n.classList.toggle("atv-hidden", count <= 1));
    head.input.replaceChildren();
    const choices = ["mean", ...Array.from({ length: count > 1 ? count : 0 }, (_, i) => i)];
    for (const c of choices) {
      const option = element("option", "", c === "mean" ? "mean of heads" : `head ${c}`);
      option.value = String(c);
      head.input.appendChild(option);
    }
    head.input.value = String(model.get("head"));
  }

  function drawSamples() {
    const options = model.get("sample_options");
    sample.rows.forEach((n) => n.classList.toggle("atv-hidden", options.length <= 1));
    sample.input.replaceChildren();
    for (const s of options) {
      const option = element("option", "", `sample ${s}`);
      option.value = String(s);
      sample.input.appendChild(option);
    }
    sample.input.value = String(model.get("sample"));
  }

  function drawOpacity() {
    const value = model.get("opacity");
    opacity.input.value = Math.round(value * 100);
    opacity.value.textContent = `${Math.round(value * 100)} %`;
    opacity.input.setAttribute("aria-valuetext", opacity.value.textContent);
    // only a map over an image: a map drawn alone keeps the colours of the colour bar
    for (const img of panels.querySelectorAll("img.atv-map.atv-over")) img.style.opacity = String(value);
  }

  function drawPanels() {
    const alpha = model.get("opacity");
    panels.replaceChildren();
    for (const run of model.get("panels")) {
      const block = element("div", "atv-run");
      block.dataset.role = run.role;
      const label = element("div", "atv-run-label", run.label ? `${run.label} — ` : "");
      label.appendChild(element("span", "atv-prompt", `“${run.prompt}”`));
      const row = element("div", "atv-row");
      const figure = (caption, map, mean, note) => {
        const fig = element("figure", "atv-panel");
        const stack = element("div", "atv-stack");
        if (run.image) {
          const img = element("img", "atv-image");
          img.src = `data:image/png;base64,${run.image}`;
          img.alt = "generated image";
          stack.appendChild(img);
        }
        if (map) {
          const img = element("img", "atv-map");
          img.src = `data:image/png;base64,${map}`;
          img.alt = `attention map of ${caption}`;
          if (run.image) {
            img.classList.add("atv-over");
            img.style.opacity = String(alpha);
          } else img.style.position = "static";
          stack.appendChild(img);
        }
        const cap = element("figcaption", "", caption);
        const detail = note || (mean === undefined ? "\u00a0" : `mean ${number(mean)}`);
        cap.appendChild(element("div", "atv-mean", detail));
        fig.append(stack, cap);
        return fig;
      };
      if (run.image) row.appendChild(figure("image"));
      for (const m of run.maps) {
        const fig = figure(m.word, m.png, m.mean, m.note);
        fig.dataset.word = m.word;
        row.appendChild(fig);
      }
      block.append(label, row);
      panels.appendChild(block);
    }
  }

  function drawBar() {
    barImage.src = `data:image/png;base64,${model.get("colorbar")}`;
    // no map has a value (every selected step gated, or NaN): no scale to state
    const drawn = model.get("panels").some((run) => run.maps.some((m) => m.mean !== null && m.mean !== undefined));
    barMin.textContent = drawn ? number(model.get("map_min")) : "—";
    barMax.textContent = drawn ? number(model.get("map_max")) : "—";
  }

  function drawAll() {
    drawWords();
    drawSites();
    drawSteps();
    drawHeads();
    drawSamples();
    drawPanels();
    drawOpacity();
    drawBar();
    summary.textContent = model.get("summary");
    table.innerHTML = model.get("table_html"); // built and escaped by Python
  }

  // the user's choices; "input" only moves the label, "change" (on release) asks Python for the maps
  site.input.addEventListener("input", () =>
    showSlider(site, model.get("site_labels"), Number(site.input.value), model.get("site_options").length));
  site.input.addEventListener("change", () => {
    const at = Number(site.input.value);
    send("site", at === 0 ? "all" : model.get("site_options")[at - 1]);
  });
  step.input.addEventListener("input", () =>
    showSlider(step, model.get("step_labels"), Number(step.input.value), model.get("step_mean_count")));
  step.input.addEventListener("change", () => {
    const at = Number(step.input.value);
    send("step", at === 0 ? "all" : model.get("step_options")[at - 1]);
  });
  head.input.addEventListener("change", () => {
    const value = head.input.value;
    send("head", value === "mean" ? "mean" : Number(value));
  });
  sample.input.addEventListener("change", () => send("sample", Number(sample.input.value)));
  opacity.input.addEventListener("input", () => {
    model.set("opacity", Number(opacity.input.value) / 100);
    drawOpacity();
  });
  opacity.input.addEventListener("change", () => send("opacity", Number(opacity.input.value) / 100));

  const handlers = [
    ["change:words change:word_options", drawWords],
    ["change:site change:site_options change:site_labels", drawSites],
    ["change:step change:step_options change:step_labels change:step_mean_count", drawSteps],
    ["change:head change:head_count", drawHeads],
    ["change:sample change:sample_options", drawSamples],
    ["change:opacity", drawOpacity],
    ["change:panels", drawPanels],
    ["change:map_min change:map_max change:colorbar change:panels", drawBar],
    ["change:summary", () => { summary.textContent = model.get("summary"); }],
    ["change:table_html", () => { table.innerHTML = model.get("table_html"); }],
  ];
  const pairs = handlers.flatMap(([events, handler]) => events.split(" ").map((e) => [e, handler]));
  for (const [event, handler] of pairs) model.on(event, handler);
  drawAll();
  return () => {
    for (const [event, handler] of pairs) model.off(event, handler);
  };
}

export default { render };
