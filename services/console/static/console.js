// The console's only script: optional enhancements of server-rendered pages.
// Data is inserted with textContent only, never as markup.
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// How long ago an ISO time was, worded as the server words it (present.ago): a page left open
// keeps its "5 min ago" true, and a live item gets one.
function ago(iso, now) {
  const seconds = Math.trunc((now - Date.parse(iso)) / 1000);
  const gap = Math.abs(seconds);
  if (Number.isNaN(gap)) return "";
  if (gap < 60) return "just now";
  const minutes = Math.floor(gap / 60), hours = Math.floor(gap / 3600);
  const days = Math.floor(gap / 86400);
  const count = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;
  let words;
  if (minutes < 60) words = `${minutes} min`;
  else if (hours < 48) words = `${hours} h`;
  else if (days < 60) words = count(days, "day");
  else if (days < 730) words = count(Math.floor(days / 30), "month");
  else words = count(Math.floor(days / 365), "year");
  return seconds > 0 ? `${words} ago` : `in ${words}`;
}

// A <time class="ago"> for an ISO time, its time in UTC (`title`) as its tooltip.
function agoElement(iso, title) {
  const node = element("time", ago(iso, Date.now()), "ago");
  node.dateTime = iso;
  if (title) node.title = title;
  return node;
}

function refreshAgo() {
  const now = Date.now();
  document.querySelectorAll("time.ago[datetime]").forEach((node) => {
    const words = ago(node.dateTime, now);
    if (words && node.textContent !== words) node.textContent = words;
  });
}

function refreshOverview(box) {
  const every = Number(box.dataset.every || 10000);
  setInterval(async () => {
    try {
      const reply = await fetch(box.dataset.refresh, { credentials: "same-origin" });
      if (reply.redirected) { window.location.assign(reply.url); return; }
      if (!reply.ok) return;
      // Server-rendered and escaped; parsed inert (a template runs nothing), then only what
      // changed is written: a figure's text, a link's address. Replacing the whole region
      // took the keyboard focus away from the link it was on, and made a screen reader read
      // the whole live region again.
      const fresh = document.createElement("template");
      fresh.innerHTML = await reply.text();
      patchChildren(box, fresh.content);
    } catch (error) { /* offline for a moment: the next tick retries */ }
  }, every);
}

// Makes `node` like `fresh`, touching only what differs (text, attributes, or a subtree whose
// shape changed).
function patch(node, fresh) {
  if (node.nodeType !== fresh.nodeType || node.nodeName !== fresh.nodeName) {
    node.replaceWith(fresh.cloneNode(true));
    return;
  }
  if (node.nodeType !== Node.ELEMENT_NODE) {
    if (node.nodeValue !== fresh.nodeValue) node.nodeValue = fresh.nodeValue;
    return;
  }
  for (const { name } of Array.from(node.attributes)) {
    if (!fresh.hasAttribute(name)) node.removeAttribute(name);
  }
  for (const { name, value } of Array.from(fresh.attributes)) {
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }
  patchChildren(node, fresh);
}

// Whitespace between elements is left alone: the page and the fragment differ there (the
// page's region opens with a line break), and it shows nothing.
function significant(parent) {
  return Array.from(parent.childNodes).filter(
    (child) => child.nodeType !== Node.TEXT_NODE || child.nodeValue.trim() !== "");
}

function patchChildren(node, fresh) {
  const old = significant(node);
  const want = significant(fresh);
  want.forEach((child, i) => {
    if (i < old.length) patch(old[i], child);
    else node.append(child.cloneNode(true));
  });
  old.slice(want.length).forEach((child) => child.remove());
}

// A live feed that outlives a restart of its server. The browser reconnects by itself after a
// network blip, but an answer that is not a stream (a 503 while a service restarts) or a feed
// the server ended closes an EventSource for good: the page then opens a new one itself,
// waiting longer each time, from the position it reached (the last item's id).
function liveFeed(options) {
  const status = options.status;
  let cursor = options.since || "";
  let delay = 1000;
  let source = null;

  function say(text, link, href) {
    status.textContent = text;
    if (link) {
      const again = element("a", link);
      again.href = href;
      status.append(again);
    }
  }

  function retry() {
    source.close();
    say(`${options.name} paused, retrying in ${Math.round(delay / 1000)} s…`);
    setTimeout(open, delay);
    delay = Math.min(delay * 2, 30000);
  }

  function open() {
    const join = options.url.includes("?") ? "&" : "?";
    const url = options.url + (cursor ? join + "since=" + encodeURIComponent(cursor) : "");
    source = new EventSource(url);
    source.onopen = () => { if (options.onOpen) options.onOpen(); };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) retry();
      else say(`${options.name} reconnecting…`);
    };
    source.addEventListener("started", (message) => {
      if (message.lastEventId) cursor = message.lastEventId;
      delay = 1000;
      if (options.onStarted) options.onStarted();
    });
    source.onmessage = (message) => {
      if (message.lastEventId) cursor = message.lastEventId;
      options.onItem(JSON.parse(message.data));
    };
    // Named items of a feed's own beside its entries (they move no cursor).
    for (const [name, handle] of Object.entries(options.on || {})) {
      source.addEventListener(name, (message) => handle(JSON.parse(message.data)));
    }
    source.addEventListener("paused", () => {
      source.close();
      say(`${options.name} are paused: this console follows too many profiles. `,
          "Refresh to try again", window.location.pathname);
    });
    source.addEventListener("ended", (message) => {
      const data = JSON.parse(message.data);
      const reason = data.reason;
      if (reason === "signed_out") {
        // Why, in the server's words (expired, signed out or in again in another tab, the key
        // refused), and the way on: sign in again, reload with the new session, the overview.
        source.close();
        const here = window.location.pathname + window.location.search;
        const to = { here, overview: "/overview" }[data.to] ||
          "/signin?next=" + encodeURIComponent(here);
        say(`${options.name} stopped: ${data.text || "you are signed out."} `,
            data.link || "Sign in again", to);
      } else if (reason === "gone") {
        source.close();
        say(options.gone || `${options.name} stopped.`);
      } else if (reason === "merged" && options.onMerged) {
        source.close();
        options.onMerged(JSON.parse(message.data));
      } else if (reason === "forbidden") {
        source.close();
        say(`${options.name} stopped: this key may not read them.`);
      } else {
        retry(); // a restart, a closed upstream: the feed re-reads what it missed
      }
    });
  }
  open();
}

function followProfile(box) {
  const status = document.getElementById("live-status");
  const feed = document.getElementById("live-feed");
  const seen = new Set();
  document.querySelectorAll("[data-event-id]").forEach((node) => seen.add(node.dataset.eventId));
  liveFeed({
    url: box.dataset.source,
    since: box.dataset.since,
    status,
    name: "Live updates",
    gone: "This profile no longer exists (it was erased): live updates stopped.",
    onOpen: () => { status.textContent = "Live updates connecting…"; },
    // Sent once the service follows the profile: from then on nothing is missed.
    onStarted: () => { status.textContent = "Live updates on."; },
    // Merged into another profile: the feed ended (the survivor's items are not this page's),
    // and the page says where the person is now.
    onMerged: (survivor) => {
      status.textContent = "Live updates stopped: this profile was merged into another.";
      const notice = element("p", "This profile was merged into ", "notice");
      notice.id = "merged-into";
      const link = element("a");
      link.append(element("bdi", survivor.name));
      link.href = "/profiles/" + encodeURIComponent(survivor.profile_id);
      notice.append(element("bdi", survivor.name), ": its events, devices and attributes are"
        + " that profile's now, and this page shows it as it was before. Open ", link, ".");
      liveNotice(notice);
    },
    onItem: (item) => {
      // A new state, caused by an event the feed shows: it updates its card, not the feed.
      if (item.kind === "consent") { showSubscription(item); return; }
      if (item.kind === "attribute") { showAttribute(item); return; }
      if (item.event_id) {
        if (seen.has(item.event_id)) return;
        seen.add(item.event_id);
      }
      if (item.notice) {
        // A merge into this profile or a split: what live items do not update is stale.
        const notice = element("p", item.notice + " ", "notice");
        notice.id = "reload-notice";
        const again = element("a", "Reload this page");
        again.href = window.location.pathname + window.location.search;
        notice.append(again);
        liveNotice(notice);
      }
      const entry = element("li", undefined, "new");
      if (item.event_id) entry.dataset.eventId = item.event_id;
      const time = element("span", item.time, "time");
      if (item.iso) time.append(" ", agoElement(item.iso, item.time));
      entry.append(time, " ", element("strong", item.title));
      entry.append(...pairList(item.details, "details"));
      if (item.stack_trace) {
        // Collapsed as on the timeline; text only, never markup.
        const trace = element("details", undefined, "trace");
        trace.append(element("summary", "Stack trace"), element("pre", item.stack_trace));
        entry.append(trace);
      }
      entry.append(...pairList(item.origin, "details origin"));
      feed.prepend(entry);
    },
  });
}

// A notice at the head of the profile page, in its live region; it replaces an earlier one
// of the same ID.
function liveNotice(notice) {
  const region = document.getElementById("live-notices");
  if (!region) return;
  const before = document.getElementById(notice.id);
  if (before) before.replaceWith(notice); else region.append(notice);
}

// (name, value) pairs as the timeline lists them: none when there are none.
function pairList(pairs, className) {
  if (!pairs || !pairs.length) return [];
  const list = element("ul", undefined, className);
  for (const [key, value] of pairs) {
    const row = element("li");
    row.append(element("span", key, "key"), " ", element("bdi", value));
    list.append(row);
  }
  return [list];
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
    row.cells[3].replaceWith(timeCell(item.time));
  }
}

// The Person cell of a live segment table's row: the person's name (else their custom ID,
// "Anonymous 1a2b3c4d", or "profile 1a2b3c4d" while the users table does not list them),
// linked unless erased, the whole ID under it (eight characters of it can be two profiles),
// and what became of them ("merged into …", "erased", "not in the users table yet").
function personCell(cell, person, profileId) {
  cell.replaceChildren();
  cell.className = "value";
  cell.dataset.state = person.state || "";
  const label = element("bdi", person.name || profileId);
  if (person.state === "erased") {
    cell.append(label);
  } else {
    const link = element("a");
    link.append(label);
    link.href = "/profiles/" + encodeURIComponent(profileId);
    cell.append(link);
  }
  cell.append(element("div", profileId, "hint"));
  if (person.note) cell.append(element("div", person.note, "muted person-note"));
}

function followSegments(table) {
  const status = document.getElementById("segment-status");
  const body = table.querySelector("tbody");
  const openText = table.dataset.openText ||
    "Live: the changes recorded in the last hour, then as they are recorded.";
  liveFeed({
    url: table.dataset.source,
    status,
    name: "Live entries and exits",
    gone: "This segment no longer exists (it was deleted): live entries and exits stopped.",
    // The feed starts at the changes recorded in the last hour (WatchSegmentChanges'
    // start_time), whatever their "When": a change can be recorded long after it happened.
    onOpen: () => { status.textContent = openText; },
    on: {
      // What a second look-up learnt of a person the users table did not list yet: every
      // row of theirs shows it.
      person: (person) => {
        for (const row of body.rows) {
          if (row.dataset.profileId === person.profile_id) {
            personCell(row.cells[1], person, person.profile_id);
          }
        }
      },
    },
    onItem: (change) => {
      const row = element("tr");
      row.dataset.profileId = change.profile_id;
      const who = element("td");
      personCell(who, change, change.profile_id);
      const what = element("td", change.transition);
      if (change.cause) what.append(element("div", change.cause, "muted"));
      const segment = element("td");
      segment.append(element("bdi", change.segment));
      row.dataset.time = change.time;
      row.append(element("td", change.time), who, what, segment);
      // Newest "When" first, as the caption says: a change recorded late (an event sent days
      // after it happened) goes below the later ones. Times read "YYYY-MM-DD HH:MM:SS UTC", in
      // the order of their text; a tie keeps the latest recorded first.
      const later = Array.from(body.rows).find((other) => other.dataset.time <= change.time);
      if (later) body.insertBefore(row, later); else body.append(row);
      while (body.rows.length > 200) body.deleteRow(-1);
    },
  });
}

// The segment form lists every kind's boxes (the page works without a script); with one, a
// condition shows only its chosen kind's boxes. `hidden` also hides them from screen readers.
function showChosenKind(condition) {
  const kind = condition.querySelector("select[id$='-kind']");
  if (!kind) return;
  const update = () => {
    condition.querySelectorAll("fieldset[data-for-kind]").forEach((set) => {
      set.hidden = !set.dataset.forKind.split(" ").includes(kind.value);
    });
  };
  kind.addEventListener("change", update);
  update();
}

// A Copy button beside an ID (`data-copy`: the exact text; `data-copy-what`: what it is, for
// the button's name). Only where the Clipboard API is (a secure context: https, or the
// console on localhost): elsewhere, and without a script, there is no button and the ID stays
// text to select. The button's status region, there from the start so that a screen reader
// hears it change, says "Copied" (or that copying failed) and is emptied a little later.
function copyButton(node) {
  if (!navigator.clipboard || !window.isSecureContext) return;
  const button = element("button", "Copy", "copy secondary");
  button.type = "button";
  button.setAttribute("aria-label", "Copy the " + node.dataset.copyWhat);
  const status = element("span", "", "copy-status");
  status.setAttribute("role", "status");
  let clear = null;
  button.addEventListener("click", async () => {
    clearTimeout(clear);
    status.textContent = "";
    try {
      await navigator.clipboard.writeText(node.dataset.copy);
      status.textContent = "Copied";
    } catch (error) {
      status.textContent = "Not copied: select the text to copy it";
    }
    clear = setTimeout(() => { status.textContent = ""; }, 4000);
  });
  node.after(" ", button, " ", status);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-copy]").forEach(copyButton);
  document.querySelectorAll("[data-condition]").forEach(showChosenKind);
  setInterval(refreshAgo, 30000);
  const overview = document.getElementById("overview");
  if (overview && overview.dataset.refresh) refreshOverview(overview);
  const live = document.getElementById("live");
  if (live) followProfile(live);
  const changes = document.getElementById("segment-changes");
  if (changes) followSegments(changes);
});
