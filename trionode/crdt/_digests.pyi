from collections.abc import Sequence

INTERFACE: int

def bind(path: str, /) -> None: ...
def digests(
    rows: Sequence[bytes], parts: tuple[bytes | tuple[int, int], ...], /
) -> list[bytes]: ...
