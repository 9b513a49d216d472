// Time-travel slider: pick one of the profile's update times and show the profile as of it.
(function () {
  var slider = document.getElementById("at-slider");
  if (!slider) return;
  var times = slider.getAttribute("data-times").split(",").map(Number);
  var input = document.getElementById("at");
  var out = document.getElementById("at-slider-value");
  function iso(t) { return new Date(t * 1000).toISOString().slice(0, 19); }
  function show() { out.textContent = iso(times[Number(slider.value)]); }
  slider.addEventListener("input", show);
  slider.addEventListener("change", function () {
    input.value = String(times[Number(slider.value)]);
    document.getElementById("time-travel").submit();
  });
  if (input.value) {
    var at = Number(input.value);
    if (!isNaN(at)) {
      for (var i = times.length - 1; i >= 0; i--) { if (times[i] <= at) { slider.value = i; break; } }
    }
  }
  show();
})();
