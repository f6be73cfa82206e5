// Drives the real Countly Node.js SDK (countly-sdk-nodejs, from package-lock.json) through a
// scenario, for tests/edge/test_countly_sdk.py. Usage: node countly_driver.js '<scenario JSON>'.
//
// The scenario: {"url": edge URL, "app_key", "storage_path" (the SDK's files: its device ID
// and queues survive between runs, as an app's do), "device_id" (optional), "fail_first"
// (optional: parameter names; the first request holding one of them is forwarded to the edge,
// which stores it, but the SDK is answered 502, so it sends the very same request again),
// "force_post" (optional: the SDK posts forms instead of GET requests),
// "steps": [[action, ...args], ...]}.
//
// The SDK talks to the edge through a small proxy in this process, which prints one JSON line
// per answer ({"status": ..., "params": [...]}) so the test can follow what the edge answered.
// A fake clock (Date's getTime moved by "advance" steps) gives sessions durations without
// waiting for them. The script ends once the SDK's queues are empty, printing
// {"done": true, "device_id": ...}, or exits 2 when they are not empty in time.
"use strict";

const http = require("http");
const path = require("path");
const Countly = require("countly-sdk-nodejs");
const CountlyStorage = require("countly-sdk-nodejs/lib/countly-storage.js");

const scenario = JSON.parse(process.argv[2]);
const edge = new URL(scenario.url);
const failFirst = new Set(scenario.fail_first || []);
let failed = 0;
let inFlight = 0;

const realGetTime = Date.prototype.getTime;
let clockOffsetMs = 0;
Date.prototype.getTime = function getTime() {
    return realGetTime.call(this) + clockOffsetMs;
};

function say(line) {
    process.stdout.write(`${JSON.stringify(line)}\n`);
}

function paramNames(url, body) {
    const query = new URL(url, "http://proxy").searchParams;
    const names = new Set(query.keys());
    if (body.length) {
        for (const key of new URLSearchParams(body.toString()).keys()) {
            names.add(key);
        }
    }
    return [...names];
}

function startProxy() {
    const proxy = http.createServer((request, response) => {
        inFlight += 1;
        response.on("close", () => {
            inFlight -= 1;
        });
        const chunks = [];
        request.on("data", (chunk) => chunks.push(chunk));
        request.on("end", () => {
            const body = Buffer.concat(chunks);
            const names = paramNames(request.url, body);
            const forwarded = http.request(
                {
                    host: edge.hostname,
                    port: edge.port,
                    path: request.url,
                    method: request.method,
                    headers: { ...request.headers, host: edge.host },
                },
                (answer) => {
                    const parts = [];
                    answer.on("data", (chunk) => parts.push(chunk));
                    answer.on("end", () => {
                        let status = answer.statusCode;
                        let text = Buffer.concat(parts);
                        const drop = failed === 0 && names.some((name) => failFirst.has(name));
                        if (drop && status === 200) {
                            failed += 1;
                            status = 502;
                            text = Buffer.from("answer lost on the way back");
                        }
                        say({
                            status,
                            edge_status: answer.statusCode,
                            method: request.method,
                            params: names,
                        });
                        response.writeHead(status, { "content-type": "application/json" });
                        response.end(text);
                    });
                },
            );
            forwarded.on("error", (error) => {
                say({ status: 502, error: String(error), params: names });
                response.writeHead(502);
                response.end();
            });
            forwarded.end(body);
        });
    });
    return new Promise((resolve) => {
        proxy.listen(0, "127.0.0.1", () => resolve(proxy));
    });
}

// The SDK's loop (its `interval`): each turn moves queued events into a request and sends at
// most one request. Its default is 500 ms; a short loop sends a scenario's requests without the
// test waiting a turn for each. The driver's own waits are counted in turns of it.
const LOOP_MS = 50;

function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}

// What the SDK still has to send, including a request on its way (the SDK takes a request out
// of its queue while sending it, and puts it back when it failed).
function pending() {
    const requests = CountlyStorage.storeGet("cly_queue", []).length;
    return requests + CountlyStorage.storeGet("cly_event", []).length + inFlight;
}

async function flush(deadlineMs) {
    const until = realGetTime.call(new Date()) + deadlineMs;
    let quiet = 0;
    // Empty three times in a row, over more than one turn of the SDK's loop: a failed request
    // is back in the queue by then.
    while (quiet < 3) {
        if (realGetTime.call(new Date()) > until) {
            say({ done: false, pending: pending() });
            process.exit(2);
        }
        quiet = pending() === 0 ? quiet + 1 : 0;
        await sleep(1.5 * LOOP_MS);
    }
}

async function main() {
    const proxy = await startProxy();
    const config = {
        app_key: scenario.app_key,
        url: `http://127.0.0.1:${proxy.address().port}`,
        storage_path: path.resolve(scenario.storage_path),
        interval: LOOP_MS,
        // Seconds before the SDK sends again after a failed request (default 60). Its clock
        // counts whole seconds, so a fraction resends at the next second: 1 waited 1 to 2 s.
        fail_timeout: 0.5,
        debug: Boolean(scenario.debug),
        app_version: "2.0.0",
        // POST (a urlencoded form) instead of GET for every request.
        force_post: Boolean(scenario.force_post),
    };
    if (scenario.device_id) {
        config.device_id = scenario.device_id;
    }
    Countly.init(config);
    const flushMs = scenario.flush_timeout_ms || 30000;
    for (const [action, ...args] of scenario.steps) {
        switch (action) {
        case "begin_session":
            Countly.begin_session();
            break;
        case "end_session":
            Countly.end_session();
            break;
        case "event":
            Countly.add_event(args[0]);
            break;
        case "user_details":
            Countly.user_details(args[0]);
            break;
        case "user_data":
            for (const [method, ...operands] of args[0]) {
                Countly.userData[method](...operands);
            }
            Countly.userData.save();
            break;
        case "error":
            Countly.log_error(new TypeError(args[0]));
            break;
        case "view":
            Countly.track_view(args[0], args[1]);
            break;
        case "remote_config":
            // Prints the callback's arguments: {"remote_config": {"error": ..., "config": ...}}.
            await new Promise((resolve) => {
                Countly.fetch_remote_config((error, config) => {
                    say({ remote_config: { error: Boolean(error), config } });
                    resolve();
                });
            });
            break;
        case "change_id":
            Countly.change_id(args[0], args[1]);
            break;
        case "advance":
            clockOffsetMs += args[0] * 1000;
            // The SDK's own heartbeat (every session_update seconds) sees the time passed.
            await sleep(3 * LOOP_MS);
            break;
        case "flush":
            await flush(flushMs);
            break;
        default:
            throw new Error(`unknown action ${action}`);
        }
    }
    await flush(flushMs);
    say({ done: true, device_id: Countly.get_device_id(), failed });
    proxy.close();
    process.exit(0);
}

main().catch((error) => {
    say({ done: false, error: String(error && error.stack) });
    process.exit(3);
});
