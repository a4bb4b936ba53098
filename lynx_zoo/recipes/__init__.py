"""Recipes: experiment drivers built on the zoo, which the core never imports (``tests/test_layout.py`` checks).

* :mod:`lynx_zoo.recipes.stages`: ``python -m lynx_zoo stages``, a grid row trained through the paper's stages.
* :mod:`lynx_zoo.recipes.study`: ``python -m lynx_zoo study``, the frozen-LLM study on a CPU (``docs/study/``).
* :mod:`lynx_zoo.recipes.shapes_study`: the study's data set (scenes with a 1-pixel pattern, phrasings held out,
  text-only captions) and its tokenizer ``lynx_zoo/shapes-study-words``; its configs name it by its full class path.

The demo's rendered-shapes VQA set (:mod:`lynx_zoo.data.shapes`) stays in the core: it is the built-in data set of
the embedded default variants (``lynx-demo``, ``lynx-tiny``), whose tokenizer ``lynx_zoo/shapes-words`` is part of
those models, and the chat page draws its example scenes from it (:mod:`lynx_zoo.serving.examples`).
The command line reaches the recipes only through its command table, on first use of a command.
"""
