"""Shared pieces of the per-architecture config dataclasses: reading config.json strictly."""
import dataclasses


class ConfigError(ValueError):
    """A config.json asks for something minisink does not implement (or is malformed)."""


def refuse(setting: str, value, why: str = "minisink does not implement it"):
    raise ConfigError(f"config.json: {setting}={value!r} is not supported: {why}")


def from_json(cls, d: dict, renames: dict[str, str] | None = None):
    """Build dataclass `cls` from config.json dict `d`: known fields only, HF aliases renamed.

    Keys that are not fields are ignored on purpose: config.json carries many that do not touch the
    forward pass (architectures, torch_dtype, use_cache, ...). Keys that do change the math and that
    minisink does not implement are refused explicitly (`refuse`) by each config's `from_dict`.
    """
    d = {(renames or {}).get(k, k): v for k, v in d.items()}
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d]
    if missing:
        raise ConfigError(f"config.json: missing required setting(s) {', '.join(missing)} for {cls.__name__}")
    return cls(**{k: v for k, v in d.items() if k in fields})
