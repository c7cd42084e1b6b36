"""``gradscope report PATH``: the checkpoint report (:mod:`.checkpoint_report`).

It loads a saved checkpoint, analyses and probes its recurrent and attention modules, and renders
the result as text, markdown, JSON or HTML. The HTML report and notebook displays of a Diagnosis
are :mod:`gradscope.render.html`; text, markdown and JSON of a Diagnosis are its methods.
"""
