"""gradscope.render: gradscope's data turned into something to look at, computing nothing new.

* :mod:`.html` — the self-contained HTML report (``diag.to_html(path)``) and the rich displays of
  notebooks (``_repr_html_`` of Recording, Diagnosis and remedy trials);
* :mod:`.text` — the text and markdown reports of a Diagnosis (``str(diag)``,
  ``diag.to_markdown()``);
* :mod:`.checkpoint` — the text, markdown and HTML of a checkpoint report (``gradscope report
  PATH``; the report itself is :mod:`gradscope.checkpoint.report`);
* :mod:`.tensorboard` — a Recording and its diagnosis as TensorBoard scalars, images and text
  (``rec.to_tensorboard(writer)``).

Figures are :mod:`gradscope.plot` (its own package, so that ``import gradscope.plot as gp`` stays
short). The JSON of a Diagnosis is its ``to_dict()`` / ``to_json()``, the data's own schema.

Renderers import the data classes; the data classes never import a renderer, not even inside a
function. They call theirs through :mod:`gradscope._renderers`, which the modules here fill when
they are imported. Importing this package imports them, and ``gradscope/__init__`` imports this
package, so any Recording or Diagnosis finds its renderers (see :mod:`gradscope._renderers` for
why the table is filled by an import and not looked up by module name). That import has to stay
cheap and work without numpy (``import gradscope.analysis.remedies`` does): numpy, matplotlib,
the plots and the data classes are imported inside the functions that draw or write.
"""
from __future__ import annotations

from . import checkpoint, html, tensorboard, text

__all__ = ["checkpoint", "html", "tensorboard", "text"]
