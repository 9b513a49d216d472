// Drives the official Node SDK (npm `mixpanel`) against a Peoplebase server.
//
// Reads a plan from stdin:
//   {"token": "...", "config": {host, port, protocol, verbose, geolocate, ...},
//    "steps": [{"call": "set", "args": ["user-1", {"plan": "pro"}, {"$ip": "..."}]}, ...]}
// Each step calls `mixpanel.people[call](...args, callback)` and waits for its callback
// before the next step starts, so the server receives the requests in plan order.
// An argument written {"$date": <ms>} is passed as a JavaScript Date.
// Writes one JSON line per step to stdout: {"step", "call", "error"} (error: null or a
// message), plus the SDK's log output as {"log": [level, message]} lines.

"use strict";

const Mixpanel = require("mixpanel");

function revive(value) {
  if (Array.isArray(value)) {
    return value.map(revive);
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === "$date") {
      return new Date(value.$date);
    }
    const out = {};
    for (const key of keys) {
      out[key] = revive(value[key]);
    }
    return out;
  }
  return value;
}

function readStdin() {
  return new Promise((resolve, reject) => {
    let text = "";
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", (chunk) => (text += chunk));
    process.stdin.on("end", () => resolve(text));
    process.stdin.on("error", reject);
  });
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function main() {
  const plan = JSON.parse(await readStdin());
  const logger = {};
  for (const level of ["trace", "debug", "info", "warn", "error"]) {
    logger[level] = (...args) => emit({ log: [level, args.map(String).join(" ")] });
  }
  const mixpanel = Mixpanel.init(plan.token, { ...plan.config, logger });
  for (let i = 0; i < plan.steps.length; i++) {
    const step = plan.steps[i];
    const method = mixpanel.people[step.call];
    if (typeof method !== "function") {
      throw new Error("no such people method: " + step.call);
    }
    const error = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve("callback never called"), 30000);
      method.call(mixpanel.people, ...revive(step.args), (err) => {
        clearTimeout(timer);
        resolve(err ? String(err.message || err) : null);
      });
    });
    emit({ step: i, call: step.call, error });
  }
}

main().catch((err) => {
  process.stderr.write(String((err && err.stack) || err) + "\n");
  process.exit(1);
});
