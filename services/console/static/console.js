// The console's only script: optional enhancements of server-rendered pages.
// Data is inserted with textContent only, never as markup.
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function refreshOverview(box) {
  const every = Number(box.dataset.every || 10000);
  setInterval(async () => {
    try {
      const reply = await fetch(box.dataset.refresh, { credentials: "same-origin" });
      if (reply.redirected) { window.location.assign(reply.url); return; }
      if (reply.ok) box.innerHTML = await reply.text(); // server-rendered and escaped
    } catch (error) { /* offline for a moment: the next tick retries */ }
  }, every);
}

function followProfile(box) {
  const status = document.getElementById("live-status");
  const feed = document.getElementById("live-feed");
  const seen = new Set();
  document.querySelectorAll("[data-event-id]").forEach((node) => seen.add(node.dataset.eventId));
  let url = box.dataset.source;
  if (box.dataset.since) url += "?since=" + encodeURIComponent(box.dataset.since);
  const source = new EventSource(url);
  source.onopen = () => { status.textContent = "Live updates connecting…"; };
  source.onerror = () => { status.textContent = "Live updates reconnecting…"; };
  // Sent once the service follows the profile: from then on nothing is missed.
  source.addEventListener("started", () => { status.textContent = "Live updates on."; });
  source.onmessage = (message) => {
    const item = JSON.parse(message.data);
    // A new state, caused by an event the feed shows: it updates its card, not the feed.
    if (item.kind === "consent") { showSubscription(item); return; }
    if (item.kind === "attribute") { showAttribute(item); return; }
    if (item.event_id) {
      if (seen.has(item.event_id)) return;
      seen.add(item.event_id);
    }
    const entry = element("li", undefined, "new");
    if (item.event_id) entry.dataset.eventId = item.event_id;
    entry.append(element("span", item.time, "time"), " ", element("strong", item.title));
    if (item.details && item.details.length) {
      const list = element("ul", undefined, "details");
      for (const [key, value] of item.details) {
        const row = element("li");
        row.append(element("span", key, "key"), " " + value);
        list.append(row);
      }
      entry.append(list);
    }
    feed.prepend(entry);
  };
  source.addEventListener("paused", () => {
    source.close();
    status.textContent = "Live updates are paused: this console follows too many profiles. ";
    const again = element("a", "Refresh to try again");
    again.href = window.location.pathname;
    status.append(again);
  });
  source.addEventListener("ended", (message) => {
    const reason = JSON.parse(message.data).reason;
    if (reason === "signed_out") { source.close(); window.location.reload(); }
    // Otherwise the browser reconnects by itself and the server re-reads what was missed.
  });
}

// A time as the page writes it: it wraps between date, time and zone, never inside the date.
function timeCell(text) {
  const cell = element("td", undefined, "when");
  for (const part of text.split(" ")) cell.append(element("span", part), " ");
  return cell;
}

// The row of a table by its data attribute, or null.
function findRow(table, attribute, key) {
  for (const row of table.tBodies[0].rows) {
    if (row.dataset[attribute] === key) return row;
  }
  return null;
}

// The row of a table by its data attribute; a new one (replacing the "None." row) if missing.
function rowOf(table, attribute, key, cells) {
  const found = findRow(table, attribute, key);
  if (found) return found;
  const body = table.tBodies[0];
  const row = element("tr");
  row.dataset[attribute] = key;
  for (let i = 0; i < cells; i++) row.append(element("td"));
  body.querySelectorAll("tr.none").forEach((none) => none.remove());
  body.append(row);
  return row;
}

function showSubscription(item) {
  const table = document.getElementById("subscriptions");
  if (!table) return;
  table.hidden = false;
  const none = document.getElementById("no-subscriptions");
  if (none) none.remove();
  const row = rowOf(table, "subscription", item.channel + " " + item.channel_kind, 4);
  row.cells[0].textContent = item.channel;
  row.cells[1].textContent = item.channel_kind;
  row.cells[2].textContent = item.state;
  row.cells[3].replaceWith(timeCell(item.time));
}

function showAttribute(item) {
  const table = document.getElementById(item.native ? "native-attributes" : "custom-attributes");
  if (!table) return;
  if (item.removed) {
    const gone = findRow(table, "attribute", item.name);
    if (gone) gone.remove();
    return;
  }
  const row = rowOf(table, "attribute", item.name, item.native ? 2 : 4);
  if (item.native) {
    row.cells[0].textContent = item.label;
    row.cells[1].textContent = item.value;
    row.cells[1].className = "value";
  } else {
    row.cells[0].textContent = item.name;
    row.cells[1].textContent = item.type;
    row.cells[2].textContent = item.value;
    row.cells[2].className = "value";
    row.cells[3].textContent = item.time;
  }
}

function followSegments(table) {
  const status = document.getElementById("segment-status");
  const body = table.querySelector("tbody");
  const source = new EventSource(table.dataset.source);
  source.onopen = () => { status.textContent = "Live: entries and exits of the last hour, then as they happen."; };
  source.onerror = () => { status.textContent = "Reconnecting…"; };
  source.onmessage = (message) => {
    const change = JSON.parse(message.data);
    const row = element("tr");
    const link = element("a", change.profile_id.slice(0, 8));
    link.href = "/profiles/" + encodeURIComponent(change.profile_id);
    const who = element("td");
    who.append(link);
    row.append(element("td", change.time), who, element("td", change.transition), element("td", change.segment));
    body.prepend(row);
    while (body.rows.length > 200) body.deleteRow(-1);
  };
  source.addEventListener("ended", (message) => {
    if (JSON.parse(message.data).reason === "signed_out") { source.close(); window.location.reload(); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const overview = document.getElementById("overview");
  if (overview && overview.dataset.refresh) refreshOverview(overview);
  const live = document.getElementById("live");
  if (live) followProfile(live);
  const changes = document.getElementById("segment-changes");
  if (changes) followSegments(changes);
});
