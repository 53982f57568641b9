"""A minimal TOML writer for the configurations the tests generate (the standard
library only reads TOML)."""


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(doc: dict) -> str:
    out: list[str] = []

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_aot(v)}
        if prefix and (scalars or not d):
            out.append(f"[{prefix}]")
        for k, v in scalars.items():
            out.append(f"{_key(k)} = {_value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            if isinstance(v, dict):
                table(name, v)
            elif _is_aot(v):
                for item in v:
                    out.append(f"[[{name}]]")
                    for ik, iv in item.items():
                        out.append(f"{_key(ik)} = {_value(iv)}")

    table("", doc)
    return "\n".join(out) + "\n"


def _is_aot(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return _value(k)
