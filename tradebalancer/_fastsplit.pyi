from collections.abc import Mapping

class Router:
    def __init__(
        self, pipes: int, route_keys: Mapping[str, str], default_key: str, limit: int
    ) -> None: ...
    @property
    def layout_events(self) -> int: ...
    def route(self, frame: bytes | bytearray | memoryview, out: list[list[bytes]], /) -> int: ...
    def route_frames(
        self,
        buffer: bytes | bytearray | memoryview,
        start: int,
        max_size: int,
        out: list[list[bytes]],
        stamps: list[float],
        /,
    ) -> tuple[int, int, int]: ...
    def pipe_events(self) -> list[int]: ...

def plain_frames(buffer: bytes | bytearray | memoryview, start: int, max_size: int, /) -> int: ...
def valid_ascii_json(buffer: bytes | bytearray | memoryview, /) -> bool: ...
def _valid_json_tokens(buffer: bytes | bytearray | memoryview, /) -> bool: ...
def _valid_json_blocks(buffer: bytes | bytearray | memoryview, /) -> bool: ...  # SSE2 builds
def _valid_json_blocks_sse2(buffer: bytes | bytearray | memoryview, /) -> bool: ...  # SSE2 builds

block_reader: str  # the block reader's build the router uses: "avx2", "sse2" or "none"
