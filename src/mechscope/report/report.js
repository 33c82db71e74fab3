// mechscope report: renders the views described in the JSON block #ms-data. No library, no network.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const data = JSON.parse(document.getElementById("ms-data").textContent);
  const tip = document.getElementById("ms-tip");
  let attentionViewer = null;  // set when the report has attention patterns

  function el(tag, attrs, parent, text) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
    return Math.abs(v) >= 100 || (Math.abs(v) < 0.001 && v !== 0) ? v.toExponential(2) : v.toFixed(3);
  }
  function showTip(event, text) {
    tip.textContent = text;
    tip.style.display = "block";
    tip.style.left = (event.pageX + 12) + "px";
    tip.style.top = (event.pageY + 12) + "px";
  }
  function hideTip() { tip.style.display = "none"; }
  function hover(node, text) {
    node.addEventListener("mousemove", (e) => showTip(e, text));
    node.addEventListener("mouseleave", hideTip);
  }

  // Colours: signed values on blue-white-red, fractions in [0, 1] on white-purple. The square root
  // keeps small effects visible beside one large one.
  function colour(v, scale, diverging) {
    if (v === null || Number.isNaN(v)) return "#eee";
    const r = Math.max(-1, Math.min(1, scale ? v / scale : 0)), t = Math.sign(r) * Math.sqrt(Math.abs(r));
    if (!diverging) {
      const a = Math.max(0, t);
      return `rgb(${Math.round(255 - 150 * a)},${Math.round(255 - 200 * a)},${Math.round(255 - 60 * a)})`;
    }
    const a = Math.abs(t);
    return t >= 0 ? `rgb(255,${Math.round(255 - 200 * a)},${Math.round(255 - 200 * a)})`
                  : `rgb(${Math.round(255 - 200 * a)},${Math.round(255 - 170 * a)},255)`;
  }

  // A heatmap of values[row][col] with labelled axes; onClick(rowIndex, colIndex).
  function heatmap(parent, m, onClick) {
    const rows = m.rows.length, cols = m.cols.length;
    const cell = Math.max(8, Math.min(28, Math.floor(760 / cols)));
    const rowH = Math.max(8, Math.min(22, Math.floor(560 / rows)));
    const longest = Math.max(...m.cols.map((c) => c.length));
    const left = 70, top = 20 + Math.min(110, 7 * longest);
    const width = Math.max(left + cols * cell + 20, 380), height = top + rows * rowH + 30;
    const svg = el("svg:svg", { width, height, class: "heatmap", "data-title": m.title }, parent);
    const flat = m.values.flat().filter((v) => v !== null && !Number.isNaN(v));
    const scale = m.scale || (m.diverging === false ? 1 : Math.max(1e-9, ...flat.map(Math.abs)));
    m.values.forEach((row, i) => row.forEach((v, j) => {
      const r = el("svg:rect", { x: left + j * cell, y: top + i * rowH, width: cell - 1, height: rowH - 1,
                                 fill: colour(v, scale, m.diverging !== false), class: "cell",
                                 "data-row": i, "data-col": j }, svg);
      hover(r, `${m.rowTitle} ${m.rows[i]}, ${m.colTitle} ${m.cols[j]}: ${fmt(v)}`);
      if (onClick) r.addEventListener("click", () => onClick(i, j));
    }));
    (m.marks || []).forEach(([i, j]) => el("svg:rect", { x: left + j * cell, y: top + i * rowH, width: cell - 1,
                                                         height: rowH - 1, class: "mark" }, svg));
    m.rows.forEach((label, i) => {
      if (rows > 40 && i % 2) return;
      el("svg:text", { x: left - 4, y: top + i * rowH + rowH * 0.75, "text-anchor": "end", class: "tick" }, svg, label);
    });
    m.cols.forEach((label, j) => {
      el("svg:text", { x: 0, y: 0, class: "tick", "text-anchor": "start",
                       transform: `translate(${left + j * cell + cell * 0.7},${top - 4}) rotate(-60)` }, svg, label);
    });
    el("svg:text", { x: 4, y: top - 6, class: "axis" }, svg, m.rowTitle + " \u2193");
    el("svg:text", { x: left, y: height - 8, class: "axis" }, svg,
       `${m.colTitle} \u2192   colour: ${m.diverging === false ? "0" : "-" + fmt(scale)} .. ${fmt(scale)} (square-root scale)`);
    return svg;
  }

  function section(title, note) {
    const s = el("section", {}, document.getElementById("ms-main"));
    el("h2", {}, s, title);
    if (note) el("p", { class: "note" }, s, note);
    return s;
  }

  // An Othello board: discs [square] (+1 black, -1 white), shade [square] (probabilities), rings
  // {square: colour}, dots [squares] (predicted moves); hover names the square.
  function square(i, size) { return String.fromCharCode(65 + Math.floor(i / size)) + (i % size + 1); }
  function board(parent, size, o) {
    const c = 34, pad = 18, W = pad + size * c + 4;
    const svg = el("svg:svg", { width: W, height: W, class: "board" }, parent);
    const top = Math.max(1e-9, ...(o.shade || [0]));
    for (let i = 0; i < size * size; i++) {
      const x = pad + (i % size) * c, y = pad + Math.floor(i / size) * c, p = o.shade ? o.shade[i] : 0;
      const cell = el("svg:rect", { x, y, width: c, height: c, class: "square", fill: "#2e7d4f", "data-square": square(i, size) }, svg);
      if (p > 0) el("svg:rect", { x, y, width: c, height: c, fill: "#ffd34d", "fill-opacity": 0.85 * p / top, "pointer-events": "none" }, svg);
      if (o.discs[i]) el("svg:circle", { cx: x + c / 2, cy: y + c / 2, r: c * 0.4, class: o.discs[i] > 0 ? "disc black" : "disc white" }, svg);
      else if (p >= 0.05) el("svg:text", { x: x + c / 2, y: y + c / 2 + 4, "text-anchor": "middle", class: "prob" }, svg, Math.round(100 * p));
      if (o.rings && o.rings[i]) el("svg:circle", { cx: x + c / 2, cy: y + c / 2, r: c * 0.46, class: "ring", stroke: o.rings[i] }, svg);
      if (o.dots && o.dots.includes(i)) el("svg:circle", { cx: x + c - 7, cy: y + 7, r: 3.5, class: "dot" }, svg);
      hover(cell, square(i, size) + (o.shade ? `: next-move probability ${fmt(p)}` : ""));
    }
    for (let k = 0; k < size; k++) {
      el("svg:text", { x: pad + k * c + c / 2, y: 12, "text-anchor": "middle", class: "tick" }, svg, String(k + 1));
      el("svg:text", { x: 8, y: pad + k * c + c / 2 + 4, "text-anchor": "middle", class: "tick" }, svg, String.fromCharCode(65 + k));
    }
    return svg;
  }
  function rings(squares, colour) { return Object.fromEntries(squares.map((i) => [i, colour])); }
  function names(squares, size) { return squares.length ? squares.map((i) => square(i, size)).join(" ") : "none"; }
  function boardBox(parent, title) {
    const wrap = el("div", { class: "board-wrap" }, parent);
    el("div", { class: "board-title" }, wrap, title);
    return wrap;
  }
  const SIDE = { 1: "black", "-1": "white", 0: "nobody (game over)" };

  const render = {
    summary(v) {
      const s = section(v.title);
      const grid = el("div", { class: "summary" }, s);
      for (const [label, value] of v.items) {
        const card = el("div", { class: "card" }, grid);
        el("div", { class: "label" }, card, label);
        el("div", { class: "value" }, card, value);
      }
    },
    table(v) {
      const s = section(v.title, v.note);
      const t = el("table", {}, s);
      const head = el("tr", {}, el("thead", {}, t));
      v.columns.forEach((c) => el("th", {}, head, c));
      const body = el("tbody", {}, t);
      v.rows.forEach((row) => {
        const tr = el("tr", {}, body);
        row.forEach((c) => el("td", {}, tr, typeof c === "number" ? fmt(c) : c));
      });
    },
    heatmaps(v) {
      const s = section(v.title, v.note);
      const pick = el("select", { class: "map-select" }, s);
      v.maps.forEach((m, i) => el("option", { value: i }, pick, m.title));
      const box = el("div", { class: "map-box" }, s);
      const draw = () => {
        box.innerHTML = "";
        const m = v.maps[pick.value];
        if (m.note) el("p", { class: "note" }, box, m.note);
        heatmap(box, m, m.heads && attentionViewer ? (i, j) => attentionViewer.show(+m.rows[i], +m.cols[j]) : null);
      };
      pick.addEventListener("change", draw);
      draw();
    },
    attention(v) {
      const s = section(v.title, v.note);
      const p = v.patterns;
      const [nPrompts, nLayers, nHeads, nPos] = p.shape;
      const bytes = Uint8Array.from(atob(p.uint8_base64), (c) => c.charCodeAt(0));
      const controls = el("div", { class: "controls" }, s);
      const select = (label, n, names) => {
        const wrap = el("label", {}, controls, label + " ");
        const sel = el("select", { class: "attn-" + label }, wrap);
        for (let i = 0; i < n; i++) el("option", { value: i }, sel, names ? names[i] : String(i));
        return sel;
      };
      const prompt = select("prompt", nPrompts, p.tokens.map((t, i) => `${i}: ${t.join("").slice(0, 60)}`));
      const layer = select("layer", nLayers);
      const head = select("head", nHeads);
      const box = el("div", { class: "attn-box" }, s);
      const draw = () => {
        const P = +prompt.value, L = +layer.value, H = +head.value, toks = p.tokens[P], n = toks.length;
        const base = (((P * nLayers + L) * nHeads + H) * nPos) * nPos;
        const values = [];
        for (let q = 0; q < n; q++) {
          const row = [];
          for (let k = 0; k < n; k++) row.push(bytes[base + q * nPos + k] / 255);
          values.push(row);
        }
        const labels = toks.map((t, i) => `${i} ${t}`);
        box.innerHTML = "";
        el("p", { class: "note attn-title" }, box, `head ${L}.${H}, prompt ${P}: each row is a query token, each column a key token`);
        heatmap(box, { title: `attention ${L}.${H}`, rows: labels, cols: labels, values, rowTitle: "query",
                       colTitle: "key", diverging: false });
      };
      [prompt, layer, head].forEach((x) => x.addEventListener("change", draw));
      attentionViewer = {
        show(L, H) {
          layer.value = L; head.value = H; draw();
          s.scrollIntoView({ behavior: "instant", block: "start" });
        },
      };
      draw();
    },
    graph(v) {
      const s = section(v.title, v.note);
      const layers = [...new Set(v.nodes.map((n) => n.layer))].sort((a, b) => a - b);
      const col = new Map(layers.map((l, i) => [l, i]));
      const perLayer = new Map();
      v.nodes.forEach((n) => { n.slot = perLayer.get(n.layer) || 0; perLayer.set(n.layer, n.slot + 1); });
      const maxSlots = Math.max(1, ...perLayer.values());
      const dx = Math.max(60, Math.min(110, 900 / Math.max(1, layers.length))), dy = 46;
      const top = 30 + 0.125 * (layers.length - 1) * dx;  // room for the highest arc
      const width = 80 + layers.length * dx, height = top + 30 + maxSlots * dy;
      const svg = el("svg:svg", { width, height, class: "graph" }, s);
      const pos = new Map();
      v.nodes.forEach((n) => pos.set(n.id, [50 + col.get(n.layer) * dx, top + n.slot * dy]));
      const maxW = {};  // widths are relative within a kind of edge (path effects, direct effects)
      v.edges.forEach((e) => { maxW[e.kind] = Math.max(maxW[e.kind] || 1e-9, Math.abs(e.value)); });
      v.edges.forEach((e) => {
        // arcs, so that an edge never runs through the heads between its ends
        const [x1, y1] = pos.get(e.source), [x2, y2] = pos.get(e.target);
        const d = `M${x1},${y1} Q${(x1 + x2) / 2},${(y1 + y2) / 2 - 0.25 * Math.abs(x2 - x1)} ${x2},${y2}`;
        const line = el("svg:path", { d, fill: "none", class: "edge", "stroke-width": 1 + 5 * Math.abs(e.value) / maxW[e.kind] }, svg);
        hover(line, `${e.source} \u2192 ${e.target}: ${e.label} ${fmt(e.value)}`);
      });
      v.nodes.forEach((n) => {
        const [x, y] = pos.get(n.id);
        const g = el("svg:g", { class: "node", "data-head": n.id }, svg);
        el("svg:circle", { cx: x, cy: y, r: 15, fill: v.colours[n.cls] || "#999" }, g);
        el("svg:text", { x, y: y + 4, "text-anchor": "middle" }, g, n.id);
        hover(g, `${n.id} (${n.cls})` + (n.info ? `\n${n.info}` : ""));
        if (attentionViewer && n.head !== undefined) g.addEventListener("click", () => attentionViewer.show(n.layer, n.head));
      });
      layers.forEach((l) => el("svg:text", { x: 50 + col.get(l) * dx, y: height - 12, "text-anchor": "middle", class: "tick" }, svg,
                                   (v.layerLabels && v.layerLabels[l]) || "L" + l));
      const legend = el("div", { class: "legend" }, s);
      Object.entries(v.colours).forEach(([cls, c]) => {
        const item = el("span", {}, legend);
        el("span", { class: "swatch", style: `background:${c}` }, item);
        item.appendChild(document.createTextNode(cls));
      });
    },
    "othello-game"(v) {
      const s = section(v.title, v.note);
      const controls = el("div", { class: "controls" }, s);
      const slider = el("input", { type: "range", min: 0, max: v.board.length - 1, value: 0, class: "move-slider" },
                        el("label", {}, controls, "move "));
      const layer = el("select", { class: "layer-select" }, el("label", {}, controls, " probes at layer "));
      v.layers.forEach((name, i) => el("option", { value: i }, layer, name));
      layer.value = v.best;
      const info = el("p", { class: "note game-info" }, s);
      const box = el("div", { class: "boards" }, s);
      const draw = () => {
        const t = +slider.value, L = +layer.value, n = v.size * v.size, truth = v.board[t], read = v.reading[L][t];
        const wrong = [...Array(n).keys()].filter((i) => read[i] !== truth[i]);
        const best = v.probs[t].indexOf(Math.max(...v.probs[t]));
        box.innerHTML = "";
        board(boardBox(box, `after move ${t + 1} (${square(v.moves[t], v.size)} by ${SIDE[v.mover[t]]})`), v.size,
              { discs: truth, shade: v.legal[t].length ? v.probs[t] : null, rings: rings(v.legal[t], "#00e5ff") });
        board(boardBox(box, `as the probes at layer ${v.layers[L]} read it`), v.size, { discs: read, rings: rings(wrong, "#e53935") });
        info.textContent = `Move ${t + 1} of ${v.board.length}; ${SIDE[v.to_move[t]]} to move. ` +
          (v.legal[t].length ? `The model's top move ${square(best, v.size)} is ${v.legal[t].includes(best) ? "legal" : "NOT legal"}` +
           ` (legal: ${names(v.legal[t], v.size)}). ` : "") +
          `Probe errors at layer ${v.layers[L]}: ${wrong.length} of ${n} squares${wrong.length ? " (" + names(wrong, v.size) + ")" : ""}.`;
      };
      [slider, layer].forEach((x) => x.addEventListener("input", draw));
      layer.addEventListener("change", draw);
      draw();
    },
    "othello-edits"(v) {
      const s = section(v.title, v.note);
      const pick = el("select", { class: "edit-select" }, s);
      v.examples.forEach((e, i) => el("option", { value: i }, pick,
        `case ${i + 1}: game ${e.game}, move ${e.move + 1}, flip ${square(e.square, v.size)}`));
      const info = el("p", { class: "note edit-info" }, s);
      const box = el("div", { class: "boards" }, s);
      const draw = () => {
        const e = v.examples[pick.value], after = e.intervention.top, right = after.join() === [...e.legal_after].sort((a, b) => a - b).join();
        box.innerHTML = "";
        board(boardBox(box, "before: no edit"), v.size, { discs: e.board, shade: e.none.probs, dots: e.none.top,
                                                       rings: rings(e.legal_before, "#00e5ff") });
        const r = rings(e.legal_after, "#00e5ff");
        r[e.square] = "#ff2bd6";
        board(boardBox(box, `after flipping ${square(e.square, v.size)} along the probes`), v.size,
              { discs: e.edited, shade: e.intervention.probs, dots: after, rings: r });
        info.textContent = `${SIDE[e.to_move]} to move. Legal before: ${names(e.legal_before, v.size)}; legal after the flip: ` +
          `${names(e.legal_after, v.size)}. The model predicts ${names(after, v.size)} after the edit (` +
          `${right ? "exactly right" : "not exactly right"}); with no edit ${names(e.none.top, v.size)}; ` +
          `with a random direction ${names(e.random.top, v.size)}.`;
      };
      pick.addEventListener("change", draw);
      draw();
    },
    lines(v) {
      const s = section(v.title, v.note);
      const W = Math.max(420, 60 + 22 * v.x.length), H = 340, m = 50;
      const svg = el("svg:svg", { width: W, height: H, class: "lines" }, s);
      const ys = v.series.flatMap((x) => x.values).filter((y) => y !== null);
      const lo = Math.min(0, ...ys), hi = Math.max(1e-9, ...ys);
      const sx = (i) => m + i / Math.max(1, v.x.length - 1) * (W - 2 * m), sy = (y) => H - m - (y - lo) / (hi - lo) * (H - 2 * m);
      el("svg:line", { x1: m, y1: H - m, x2: W - m, y2: H - m, class: "axisline" }, svg);
      el("svg:line", { x1: m, y1: m, x2: m, y2: H - m, class: "axisline" }, svg);
      const palette = ["#d62728", "#1f77b4", "#7f7f7f", "#bcbd22", "#9467bd", "#2ca02c"];
      const legend = el("div", { class: "legend" }, s);
      v.series.forEach((series, k) => {
        const c = palette[k % palette.length];
        const pts = series.values.map((y, i) => [i, y]).filter(([, y]) => y !== null);
        el("svg:path", { d: pts.map(([i, y], j) => `${j ? "L" : "M"}${sx(i)},${sy(y)}`).join(" "), fill: "none",
                         stroke: c, "stroke-width": 2, class: "series" }, svg);
        pts.forEach(([i, y]) => hover(el("svg:circle", { cx: sx(i), cy: sy(y), r: 3.5, style: `fill:${c}`, class: "point" }, svg),
                                      `${series.name}, ${v.xTitle} ${v.x[i]}: ${fmt(y)}`));
        const item = el("span", {}, legend);
        el("span", { class: "swatch", style: `background:${c}` }, item);
        item.appendChild(document.createTextNode(series.name));
      });
      v.x.forEach((label, i) => el("svg:text", { x: sx(i), y: H - m + 14, "text-anchor": "middle", class: "tick" }, svg, label));
      el("svg:text", { x: W / 2, y: H - 12, "text-anchor": "middle", class: "axis" }, svg, v.xTitle);
      el("svg:text", { x: 14, y: H / 2, class: "axis", transform: `rotate(-90 14 ${H / 2})`, "text-anchor": "middle" }, svg, v.yTitle);
      el("svg:text", { x: m - 4, y: m + 4, "text-anchor": "end", class: "tick" }, svg, fmt(hi));
      el("svg:text", { x: m - 4, y: H - m, "text-anchor": "end", class: "tick" }, svg, fmt(lo));
    },
    scatter(v) {
      const s = section(v.title, v.note);
      const W = 420, H = 360, m = 50;
      const svg = el("svg:svg", { width: W, height: H, class: "scatter" }, s);
      const all = v.x.concat(v.y);
      const lo = Math.min(0, ...all), hi = Math.max(1e-9, ...all);
      const sx = (x) => m + (x - lo) / (hi - lo) * (W - 2 * m), sy = (y) => H - m - (y - lo) / (hi - lo) * (H - 2 * m);
      el("svg:line", { x1: sx(lo), y1: sy(lo), x2: sx(hi), y2: sy(hi), class: "diagonal" }, svg);
      el("svg:line", { x1: m, y1: H - m, x2: W - m, y2: H - m, class: "axisline" }, svg);
      el("svg:line", { x1: m, y1: m, x2: m, y2: H - m, class: "axisline" }, svg);
      v.x.forEach((x, i) => {
        const c = el("svg:circle", { cx: sx(x), cy: sy(v.y[i]), r: 4, class: "point" }, svg);
        hover(c, `${v.labels[i]}: ${v.xTitle} ${fmt(x)}, ${v.yTitle} ${fmt(v.y[i])}`);
      });
      el("svg:text", { x: W / 2, y: H - 12, "text-anchor": "middle", class: "axis" }, svg, v.xTitle);
      el("svg:text", { x: 14, y: H / 2, class: "axis", transform: `rotate(-90 14 ${H / 2})`, "text-anchor": "middle" }, svg, v.yTitle);
      el("svg:text", { x: m, y: m + 10, class: "tick" }, svg, fmt(hi));
      el("svg:text", { x: m, y: H - m + 14, class: "tick" }, svg, fmt(lo));
    },
  };

  document.title = data.title;
  document.getElementById("ms-title").textContent = data.title;
  // The attention viewer goes first in the data so that heatmaps and the graph can link to it, but it
  // is shown where the report puts it.
  const order = data.views.map((v, i) => [v, i]);
  const placeholders = data.views.map(() => el("div", {}, document.getElementById("ms-main")));
  order.sort((a, b) => (a[0].type === "attention" ? -1 : 0) - (b[0].type === "attention" ? -1 : 0));
  for (const [view, i] of order) {
    const main = document.getElementById("ms-main");
    const before = main.children.length;
    render[view.type](view);
    while (main.children.length > before) placeholders[i].appendChild(main.children[before]);
  }
})();
