"""Property tests for trainer.config: parsers round-trip, from_dict only ever raises SettingError."""
import json
import math

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trainer import config as C
from trainer.config import BLOCK_IDS, SETTINGS, Config, SettingError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
scalars = (st.integers(min_value=-10 ** 30, max_value=10 ** 30)
           | st.floats(allow_nan=False)  # infinities included: written as 1e999
           | st.text(max_size=20)
           | st.booleans() | st.none())
literals = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3).map(tuple)
                        | st.lists(inner, max_size=3), max_leaves=8)
kwargs_dicts = st.dictionaries(identifiers, literals, max_size=5)


def _same(a, b):
    """Equality that also tells -0.0/0.0 and True/1 apart only where repr would (it does not)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@FAST
@given(kwargs_dicts)
def test_kwargs_string_round_trips(d):
    text = C.format_kwargs_string(d)
    back = C.parse_kwargs_string(text)
    assert list(back) == list(d)
    assert all(_same(back[k], d[k]) for k in d), (text, back)
    # also when the entries are one a line, as typed in a multi-line text box
    assert C.parse_kwargs_string(text.replace("; ", "\n")) == back


@FAST
@given(st.text(max_size=40))
def test_kwargs_parser_only_raises_setting_error(text):
    try:
        C.parse_kwargs_string(text)
    except SettingError as e:
        assert str(e).startswith("train_optimizer_settings: ")


# ---------------------------------------------------------------------------------------------
# from_dict on arbitrary JSON-ish input
# ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
known_keys = [s.key for s in SETTINGS] + [s.name for s in SETTINGS] + list(C.META_KEYS.values()) + ["2nd pass"]
plausible = st.sampled_from(["", "0", "1", "-1", "512", "768,512", "1e-4", "abc", "AdamW", "true", "None",
                             "BASE", "eta_min=1e-5", "x=y", "CON", "../x", "Difference", "fp16", "1:10,0.1"])
values = json_values | plausible | st.lists(st.sampled_from(BLOCK_IDS + ("IN99",)), max_size=4)
keys = st.sampled_from(known_keys) | st.text(max_size=10)
settings_dicts = st.dictionaries(keys, values, max_size=8)
nested = settings_dicts.flatmap(
    lambda d: st.one_of(st.just(d), settings_dicts.map(lambda d2: {**d, "mode": "Difference", "2nd pass": d2,
                                                                   "use_2nd_pass_settings": True})))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested | json_values, st.booleans())
def test_from_dict_raises_only_setting_error(d, strict):
    try:
        cfg = Config.from_dict(d, strict=strict)
    except SettingError as e:
        assert str(e)
        return
    # whatever was accepted survives a round trip through JSON
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20) | st.sampled_from([f"{k}=" for k in known_keys[:40]]), max_size=4),
       st.sampled_from(C.MODES))
def test_with_overrides_raises_only_setting_error(pairs, mode):
    try:
        Config.defaults(mode).with_overrides(pairs)
    except SettingError:
        pass


# ---------------------------------------------------------------------------------------------
# every valid value survives to_dict / from_dict
# ---------------------------------------------------------------------------------------------

def _text():
    return st.text(max_size=20).map(str.strip)


def _valid(s):
    """A strategy of valid typed values for one setting."""
    if s.name == "image_size":
        side = st.integers(8, 1024).map(lambda v: v * 8)
        return st.tuples(side, side).map(lambda t: tuple(sorted(t)))
    if s.name == "network_blocks":
        return st.sets(st.sampled_from(BLOCK_IDS), min_size=1).map(lambda b: tuple(x for x in BLOCK_IDS if x in b))
    if s.type is dict:
        return kwargs_dicts
    if s.name == "save_lora_name":
        return st.from_regex(r"[A-Za-z0-9ぁ-ん_\- ()]{0,20}[A-Za-z0-9]", fullmatch=True).filter(
            lambda n: n.split(".")[0].strip().upper() not in C._WINDOWS_RESERVED)
    if s.name == "train_lr_step_rules":
        rule = st.tuples(st.floats(0, 10), st.integers(0, 10 ** 6)).map(lambda t: f"{t[0]!r}:{t[1]}")
        return st.lists(rule, max_size=3).flatmap(
            lambda rules: st.floats(0, 10).map(lambda last: ",".join(rules + [repr(last)])))
    if s.name == "train_textencoder_learning_rate":
        return st.none() | st.floats(min_value=1e-12, max_value=1.0)
    if s.name == "train_seed":
        return st.integers(-1, 2 ** 32 - 1)
    if s.name == "sample_multipliers":
        return st.lists(st.floats(-10, 10), max_size=12).map(tuple)
    if s.name == "sample_seed":
        return st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=8).map(tuple)
    if s.name == "sample_size":
        side = st.integers(8, 512).map(lambda v: v * 8)
        return st.none() | st.tuples(side, side)
    if s.name == "sample_prompts":  # one prompt a line: lines are stripped, empty ones dropped
        line = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20)
        return st.lists(line.map(str.strip).filter(bool), max_size=4).map("\n".join)
    if s.type is bool:
        return st.booleans()
    if s.choices is not None and s.strict_choices:
        return st.sampled_from(s.choices)
    if s.type is int:
        lo = int(s.min) if s.min is not None else -10 ** 6
        hi = int(s.max) if s.max is not None else lo + 10 ** 6
        strat = st.integers(lo + (1 if s.min_exclusive else 0), hi)
        if s.multiple_of:
            strat = strat.map(lambda v: v - v % s.multiple_of).filter(lambda v: v >= lo)
        return strat
    if s.type is float:
        return st.floats(min_value=s.min if s.min is not None else -1e6, max_value=s.max if s.max is not None else 1e12,
                         exclude_min=s.min_exclusive, allow_nan=False, allow_infinity=False)
    if s.type is str:
        return _text()
    raise AssertionError(s.name)


VALID = {s.name: _valid(s) for s in SETTINGS}


@st.composite
def valid_configs(draw):
    mode = draw(st.sampled_from(C.MODES))
    names = draw(st.sets(st.sampled_from(sorted(VALID)), max_size=12))
    vals = {n: draw(VALID[n]) for n in names}
    lo = vals.get("train_min_timesteps", 0)
    hi = vals.get("train_max_timesteps", 1000)
    assume(lo < hi)
    meta = {k: draw(_text()) for k in draw(st.sets(st.sampled_from(sorted(C.META_KEYS)[1:]), max_size=3))}
    meta.pop("mode", None)
    cfg = Config.defaults(mode).replace(**vals, **meta)
    for n, v in vals.items():  # typed values are taken as they are
        assert getattr(cfg, n) == v, n
    if mode == "Difference" and draw(st.booleans()):
        d2 = sorted(C._D2_NAMES)
        second = {n: draw(VALID[n]) for n in draw(st.sets(st.sampled_from(d2), max_size=5))}
        s_lo = second.get("train_min_timesteps", cfg.train_min_timesteps)
        s_hi = second.get("train_max_timesteps", cfg.train_max_timesteps)
        assume(s_lo < s_hi)
        cfg = cfg.replace(second_pass=second)
    return cfg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_configs())
def test_valid_values_survive_to_dict_from_dict(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    back = Config.from_dict(data)
    assert back == cfg
    assert back.to_dict() == data
