"""The table from a renderer's name to the function that renders: how data shows itself without
importing its renderers.

Recording, Diagnosis, RemedyTrials and CheckpointReport are data. Their display methods (``_repr_html_``,
``Diagnosis.to_html``, ``Recording.to_tensorboard``) look their renderer up here by name
(``"diagnosis.html"``); the renderer modules in :mod:`gradscope.render` import the data classes
and register their functions when they are imported. So the imports run data → this module ←
renderers, and the graph has no cycle, also counting imports inside functions.

Who fills the table: ``gradscope/__init__`` imports :mod:`gradscope.render`, which imports its
renderer modules, and every ``import gradscope.<anything>`` runs ``gradscope/__init__`` first, so
the table is full before a Recording can exist. The alternative, a display method importing
``"gradscope.render.html"`` by name (``importlib``) when called, would still make the data depend
on its renderer, only hidden from the import graph.

The table is filled once, at import, and never changes after; it holds functions, not state.
This module imports nothing, so any module may import it.
"""

_RENDERERS = {}


def register(name):
    """Decorator: the function becomes the renderer called ``name`` (e.g. ``"diagnosis.html"``).

    Args:
        name: ``"<data>.<output>"``; a later registration under the same name replaces the earlier.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Example:
        >>> shout = register("example.shout")(str.upper)
        >>> renderer("example.shout")("hi")
        'HI'
        >>> del _RENDERERS["example.shout"]  # leave the table as it was
    """
    def decorate(fn):
        _RENDERERS[name] = fn
        return fn
    return decorate


def renderer(name):
    """The function registered as ``name``.

    Raises:
        LookupError: nothing is registered under ``name`` (the renderers are registered by
            ``import gradscope``; a module loaded under stub parent packages has none).

    Example:
        >>> from gradscope.render.html import diagnosis_to_html
        >>> renderer("diagnosis.html") is diagnosis_to_html
        True
    """
    try:
        return _RENDERERS[name]
    except KeyError:
        raise LookupError(
            f"no gradscope renderer named {name!r} is registered (have: {sorted(_RENDERERS)}); the renderers "
            f"register themselves when gradscope.render is imported, which `import gradscope` does.") from None
