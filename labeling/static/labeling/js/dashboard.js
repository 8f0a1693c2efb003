/* Manager dashboard: charts drawn from the JSON endpoints, and tables sortable by mouse or keyboard. */
(function () {
  "use strict";

  var PALETTE = ["#1f5fbf", "#b3261e", "#2e7d3f", "#a15c00", "#6a3fb5", "#00796b"];

  function sortTable(table, columnIndex, button) {
    var th = button.closest("th");
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var numeric = button.getAttribute("data-sort-type") === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    function key(row) {
      var cell = row.cells[columnIndex];
      var raw = cell.hasAttribute("data-sort-value") ? cell.getAttribute("data-sort-value") : cell.textContent.trim();
      if (!numeric) { return raw.toLowerCase(); }
      // Missing numbers sort last whichever way the column is sorted.
      return raw === "" ? null : parseFloat(raw);
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === y) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) { cell.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var status = document.getElementById("sort-status");
    if (status) {
      status.textContent = "Sorted by " + button.textContent + (ascending ? ", ascending" : ", descending") + ".";
    }
  }

  function initSortable(table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, index) {
      var button = th.querySelector("button[data-sort-type]");
      if (button) {
        button.addEventListener("click", function () { sortTable(table, index, button); });
      }
    });
  }

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
      if (!r.ok) { throw new Error(url + " answered " + r.status); }
      return r.json();
    });
  }

  function draw(id, config) {
    var canvas = document.getElementById(id);
    if (!canvas || !window.Chart) { return; }
    config.options = Object.assign({responsive: true, maintainAspectRatio: false, animation: false}, config.options);
    new window.Chart(canvas, config);
  }

  function projectCharts(container) {
    getJSON(container.getAttribute("data-charts-url")).then(function (data) {
      draw("chart-throughput", {
        type: "line",
        data: {
          labels: data.throughput.map(function (b) { return b.hour.slice(5, 16).replace("T", " "); }),
          datasets: [{label: "Comparisons", data: data.throughput.map(function (b) { return b.comparisons; }),
                      borderColor: PALETTE[0], backgroundColor: PALETTE[0], tension: 0.2}]
        },
        options: {scales: {y: {beginAtZero: true, ticks: {precision: 0}}}}
      });
      draw("chart-agreement-daily", {
        type: "line",
        data: {
          labels: data.agreement_daily.map(function (d) { return d.day; }),
          datasets: [{label: "Percent agreement", borderColor: PALETTE[2], backgroundColor: PALETTE[2], tension: 0.2,
                      spanGaps: true, data: data.agreement_daily.map(function (d) { return d.percent_agreement; })}]
        },
        options: {scales: {y: {min: 0, max: 1}}}
      });
      draw("chart-agreement", {
        type: "bar",
        data: {
          labels: data.agreement_by_labeler.map(function (r) { return r.labeler.username; }),
          datasets: [{label: "Agreement with others", backgroundColor: PALETTE[2],
                      data: data.agreement_by_labeler.map(function (r) { return r.agreement; })}]
        },
        options: {scales: {y: {min: 0, max: 1}}}
      });
      var choices = Object.keys(data.choices);
      draw("chart-choices", {
        type: "bar",
        data: {labels: choices, datasets: [{label: "Comparisons", backgroundColor: PALETTE[0],
                                            data: choices.map(function (c) { return data.choices[c]; })}]},
        options: {scales: {y: {beginAtZero: true, ticks: {precision: 0}}}}
      });
    }).catch(function (error) { console.warn("charts unavailable:", error); });
  }

  function rerankChart(container) {
    getJSON(container.getAttribute("data-rerank-url")).then(function (data) {
      function line(label, key, color) {
        return {label: label, borderColor: color, backgroundColor: color, tension: 0.2,
                data: data.series.map(function (p) { return p[key]; })};
      }
      draw("chart-rerank", {
        type: "line",
        data: {
          labels: data.series.map(function (p) { return p.minute.slice(11, 16); }),
          datasets: [line("Requests", "requests", PALETTE[0]), line("Cache hits", "cache_hits", PALETTE[2]),
                     line("Errors", "errors", PALETTE[1]), line("Rejected", "rejected", PALETTE[3])]
        },
        options: {scales: {y: {beginAtZero: true, ticks: {precision: 0}}}}
      });
    }).catch(function (error) { console.warn("charts unavailable:", error); });
  }

  function seriesDatasets(series) {
    return Object.keys(series).map(function (name, index) {
      var color = PALETTE[index % PALETTE.length];
      return {label: name, borderColor: color, backgroundColor: color, tension: 0.1,
              data: series[name].map(function (p) { return {x: p.step, y: p.value}; })};
    });
  }

  // The run page's charts are drawn from the curves embedded in #run-live, which htmx swaps every 2 s while the
  // run is queued or running; each swap brings new canvases, so the old charts are destroyed and new ones drawn.
  // They are drawn after the settle step (0 ms, so before the next paint): htmx settles width, height and style
  // of elements whose id survives the swap, which would otherwise blank a canvas drawn at afterSwap.
  function runCharts() {
    var source = document.getElementById("run-curves");
    if (!source) { return; }
    var curves = JSON.parse(source.textContent);
    var x = {type: "linear", title: {display: true, text: "step"}};
    draw("chart-loss", {type: "line", data: {datasets: seriesDatasets(curves.loss)}, options: {scales: {x: x}}});
    draw("chart-accuracy", {type: "line", data: {datasets: seriesDatasets(curves.accuracy)},
                            options: {scales: {x: x, y: {min: 0, max: 1}}}});
  }

  // What a swap of #run-live would otherwise reset: which "As tables" are open and where the log is scrolled.
  var runState = null;

  function runBeforeSwap(event) {
    var live = event.detail.target;
    if (!live || live.id !== "run-live" || !event.detail.shouldSwap) { return; }
    var log = document.getElementById("run-log");
    runState = {
      open: Array.prototype.map.call(live.querySelectorAll("details[id][open]"), function (d) { return d.id; }),
      logTop: log ? log.scrollTop : null,
      logAtEnd: log ? log.scrollTop + log.clientHeight >= log.scrollHeight - 4 : false
    };
    live.querySelectorAll("canvas").forEach(function (canvas) {
      var chart = window.Chart && window.Chart.getChart(canvas);
      if (chart) { chart.destroy(); }
    });
  }

  function runAfterSettle(event) {
    if (!event.target || event.target.id !== "run-live") { return; }
    if (runState) {
      runState.open.forEach(function (id) {
        var details = document.getElementById(id);
        if (details) { details.open = true; }
      });
      var log = document.getElementById("run-log");
      if (log && runState.logTop !== null) {
        log.scrollTop = runState.logAtEnd ? log.scrollHeight : runState.logTop;
      }
      runState = null;
    }
    runCharts();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table[data-sortable]").forEach(initSortable);
    var project = document.getElementById("dashboard-charts");
    if (project) { projectCharts(project); }
    var rerank = document.getElementById("rerank-charts");
    if (rerank) { rerankChart(rerank); }
    if (document.getElementById("run-live")) {
      runCharts();
      document.body.addEventListener("htmx:beforeSwap", runBeforeSwap);
      document.body.addEventListener("htmx:afterSettle", runAfterSettle);
    }
  });
})();
