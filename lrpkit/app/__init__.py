"""The application built on the library: what ``lrpkit demo / explain / evaluate`` and the bundled models need.

The library core (``lrpkit.layers``, ``canonize``, ``rules``, ``composites``/``presets``, the analyzer,
``methods``, ``evaluate``'s metrics) does not import this package; only the engine of ``lrpkit evaluate``
(:mod:`lrpkit.evaluate.runner` and its image sources) uses the zoo, the method registry and the generated data
when it runs.

- :mod:`lrpkit.app.preprocess`: how an image file becomes a model's input (timm's evaluation transform);
- :mod:`lrpkit.app.zoo`: models by name (timm, torchvision, the bundled demo models) and their class names;
- :mod:`lrpkit.app.method_registry`: every explainer by its command-line name;
- :mod:`lrpkit.app.data`: generated images with a ground-truth mask; :mod:`lrpkit.app.models`: the bundled demo
  models trained on them (weights in ``lrpkit/app/weights/``);
- :mod:`lrpkit.app.viz`: heatmaps and figures; :mod:`lrpkit.app.demo`: the demo;
- :mod:`lrpkit.app.cli` and :mod:`lrpkit.app.commands`: the command line.

The modules keep their old paths: ``lrpkit.data``, ``lrpkit.models``, ``lrpkit.viz``, ``lrpkit.demo``,
``lrpkit.cli`` and ``lrpkit.commands`` are the same module objects under a second name (see ``lrpkit/_aliases.py``),
and ``lrpkit.catalog`` is :mod:`lrpkit.app.catalog`, the names of the three modules that the catalog was split into,
kept for compatibility.
"""
