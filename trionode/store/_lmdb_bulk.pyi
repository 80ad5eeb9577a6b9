from collections.abc import Sequence

import lmdb

def bind(path: str, txn_type: type, env_type: type, /) -> None: ...
def put_run(
    txn: lmdb.Transaction,
    env: lmdb.Environment,
    db_name: bytes,
    prefix: bytes,
    keys: Sequence[bytes],
    values: Sequence[bytes],
    /,
) -> tuple[int, int]: ...
