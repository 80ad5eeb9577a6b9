from collections.abc import Callable, Sequence

import lmdb

INTERFACE: int

def bind(path: str, txn_type: type, env_type: type, /) -> None: ...
def put_run(
    txn: lmdb.Transaction,
    env: lmdb.Environment,
    db_name: bytes,
    prefix: bytes,
    keys: Sequence[bytes],
    values: Sequence[bytes],
    packer: tuple[bytes, int, Callable[[bytes], bytes | None], Callable[[bytes], bytes]]
    | None = None,
    /,
) -> tuple[int, int]: ...
