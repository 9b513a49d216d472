// Test harness for mixpanel-browser: the Python test drives the SDK through window.harness.
(function () {
  "use strict";

  // Methods that take a callback, and how many parameters come before it when the first
  // argument is a property name (`set('plan', 'pro', cb)`); when it is an object of
  // properties (`set({plan: 'pro'}, cb)`), one parameter comes before it.
  var PARAMS_BEFORE_CALLBACK = {
    set: 2, set_once: 2, increment: 2, append: 2, union: 2, remove: 2, unset: 1, clear_charges: 0
  };
  var CALLBACK_TIMEOUT_MS = 15000;

  function isPlainObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  var callbacks = [];

  function queueItems(key) {
    var raw = window.localStorage.getItem(key);
    if (raw === null) {
      return 0;
    }
    var parsed = JSON.parse(raw);
    return Array.isArray(parsed) ? parsed.length : Object.keys(parsed).length;
  }

  window.harness = {
    init: function (token, config) {
      window.mixpanel.init(token, config);
      return window.mixpanel.get_config("api_host");
    },

    // Call mixpanel.people[method](...args, callback); resolves with the value the SDK gives
    // the callback (or "no callback" after a timeout). For methods without a callback
    // (track_charge, delete_user), resolves at once with null.
    people: function (method, args) {
      var people = window.mixpanel.people;
      if (!(method in PARAMS_BEFORE_CALLBACK)) {
        people[method].apply(people, args);
        return Promise.resolve(null);
      }
      var before = isPlainObject(args[0]) && method !== "unset" ? 1 : PARAMS_BEFORE_CALLBACK[method];
      var padded = args.slice(0, before);
      while (padded.length < before) {
        padded.push(undefined);
      }
      return new Promise(function (resolve) {
        var timer = setTimeout(function () { resolve("no callback"); }, CALLBACK_TIMEOUT_MS);
        padded.push(function (response) {
          clearTimeout(timer);
          callbacks.push([method, response]);
          resolve(response);
        });
        people[method].apply(people, padded);
      });
    },

    // The same calls in order, each made once the previous one's callback has run. In batch
    // mode the callback runs when the update is in the SDK's queue, so this keeps the queue in
    // call order (calls made in the same instant can be queued in any order: the queue's
    // localStorage lock retries at random intervals).
    peopleSeq: function (steps) {
      var results = [];
      return steps.reduce(function (done, step) {
        return done.then(function () {
          return window.harness.people(step[0], step[1]).then(function (value) {
            results.push(value);
          });
        });
      }, Promise.resolve()).then(function () { return results; });
    },

    identify: function (id) { window.mixpanel.identify(id); return window.mixpanel.get_distinct_id(); },
    reset: function () { window.mixpanel.reset(); return null; },

    // Items left in the SDK's localStorage batch queues (events, people, groups), and in the
    // pre-identify people queues kept in its persistence.
    queues: function () {
      var token = window.mixpanel.get_config("token");
      var out = {};
      ["_ev", "_pp", "_gr"].forEach(function (suffix) {
        out["__mpq_" + token + suffix] = queueItems("__mpq_" + token + suffix);
      });
      var props = window.mixpanel.persistence.props;
      ["__mps", "__mpso", "__mpus", "__mpa", "__mpap", "__mpr", "__mpu"].forEach(function (key) {
        var value = props[key];
        out[key] = value === undefined ? 0 : (Array.isArray(value) ? value.length : Object.keys(value).length);
      });
      return out;
    },

    callbacks: function () { return callbacks; }
  };
})();
