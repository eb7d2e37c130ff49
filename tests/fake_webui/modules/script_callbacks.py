"""modules/script_callbacks.py: extensions register their UI tabs here."""
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {"callbacks_ui_tabs": []}


def on_ui_tabs(callback, *, name=None):
    """callback() returns None or a list of (gradio component, title, elem_id)."""
    callback_map["callbacks_ui_tabs"].append(ScriptCallback("<extension>", callback, name))


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c.callback() or []
    return res
