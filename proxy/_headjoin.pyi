# The compiled build's head writer (proxy/_headjoin.c); absent from the pure build.

def join(
    leading: tuple[bytes, ...],
    headers: list[tuple[bytes, bytes]],
    content_length: int,
    trailing: bytes,
) -> bytes: ...
