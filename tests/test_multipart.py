"""The fast multipart splitter must agree with python-multipart on every body it accepts."""

from __future__ import annotations

import random

import pytest

from app.errors import ApiError
from app.multipart import (
    Part,
    TooManyFilesError,
    split_body,
    split_simple_body,
    split_with_parser,
)

BOUNDARY = b"XyZ-7d3f:2a91"
DELIMITER = b"--" + BOUNDARY


def part(headers: list[bytes], data: bytes) -> bytes:
    return DELIMITER + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + data + b"\r\n"


def body(*parts: bytes, epilogue: bytes = b"\r\n") -> bytes:
    return b"".join(parts) + DELIMITER + b"--" + epilogue


PHOTO = bytes(range(256)) * 40 + b"\r\n-- not a delimiter\r\n--XyZ but not ours"
FILE = part(
    [
        b'Content-Disposition: form-data; name="file"; filename="a.jpg"',
        b"Content-Type: image/jpeg",
    ],
    PHOTO,
)

PLAIN_BODIES = {
    "one file": body(FILE),
    "no filename": body(part([b'Content-Disposition: form-data; name="file"'], b"xx")),
    "no epilogue": body(FILE, epilogue=b""),
    "epilogue": body(FILE, epilogue=b"\r\nignored trailing text"),
    "header case and spaces": body(
        part(
            [b'content-disposition:form-data; name="file"', b"CONTENT-TYPE:   image/png  "],
            b"png",
        )
    ),
    "several fields": body(
        part([b'Content-Disposition: form-data; name="note"'], b"camera 3"),
        FILE,
        part([b'Content-Disposition: form-data; name="file"; filename="b.jpg"'], b""),
    ),
    "utf-8 filename": body(
        part(['Content-Disposition: form-data; name="files"; filename="prüf-ü.jpg"'.encode()], b"x")
    ),
}


def as_tuples(
    parts: list[Part] | None,
) -> list[tuple[str, str | None, str | None, bytes]] | None:
    if parts is None:
        return None
    return [(p.name, p.filename, p.content_type, p.data) for p in parts]


def outcome(function: object, data: bytes, max_parts: int = 20) -> object:
    try:
        return as_tuples(function(data, BOUNDARY, max_parts=max_parts, max_files=max_parts))  # type: ignore[operator]
    except TooManyFilesError:
        return "too many"
    except ApiError as exc:
        return exc.status_code


@pytest.mark.parametrize("name", sorted(PLAIN_BODIES))
def test_plain_bodies_take_the_fast_path_and_agree(name: str) -> None:
    data = PLAIN_BODIES[name]
    fast = split_simple_body(data, BOUNDARY, max_parts=20, max_files=20)
    assert fast is not None, "a plain body must not fall back to the slow parser"
    assert as_tuples(fast) == outcome(split_with_parser, data)


def test_the_photo_bytes_survive_exactly() -> None:
    parts = split_body(PLAIN_BODIES["one file"], BOUNDARY, max_parts=2, max_files=1)
    assert parts[0].data == PHOTO
    assert (parts[0].filename, parts[0].content_type) == ("a.jpg", "image/jpeg")


UNUSUAL_BODIES = {
    "preamble": b"preamble text\r\n" + body(FILE),
    "part without headers": body(DELIMITER + b"\r\n\r\nxx\r\n"),
    "part without a name": body(part([b'Content-Disposition: form-data; filename="a"'], b"x")),
    "header line without colon": body(part([b"Content-Disposition form-data"], b"x")),
    "transport padding": body(FILE).replace(DELIMITER + b"\r\n", DELIMITER + b"  \r\n", 1),
    "no close delimiter": FILE,
    "cut in the data": body(FILE)[: len(FILE) // 2],
    "cut in the headers": FILE[:30],
    "empty": b"",
    "wrong boundary": body(FILE).replace(BOUNDARY, b"other"),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL_BODIES))
def test_unusual_bodies_are_left_to_python_multipart(name: str) -> None:
    data = UNUSUAL_BODIES[name]
    assert split_simple_body(data, BOUNDARY, max_parts=20, max_files=20) is None
    assert outcome(split_body, data) == outcome(split_with_parser, data)


def test_too_many_parts_is_the_same_error_on_both_paths() -> None:
    many = body(*[part([b'Content-Disposition: form-data; name="junk"'], b"x")] * 5)
    assert outcome(split_simple_body, many, max_parts=3) == "too many"
    assert outcome(split_with_parser, many, max_parts=3) == "too many"


def test_mutated_bodies_never_disagree() -> None:
    """Truncations, byte flips and insertions of delimiter-like bytes: wherever the fast path
    gives an answer, python-multipart gives the same one."""
    rng = random.Random(1234)
    seeds = list(PLAIN_BODIES.values())
    fast_answers = 0
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(data) + 1)
            action = rng.randrange(4)
            if action == 0:
                del data[where:]
            elif action == 1 and where < len(data):
                data[where] = rng.randrange(256)
            elif action == 2:
                data[where:where] = rng.choice([b"\r\n", b"--", DELIMITER, b"\r\n\r\n", b":"])
            else:
                del data[where : where + rng.randint(1, 4)]
        mutated = bytes(data)
        fast = outcome(split_simple_body, mutated)
        if fast is None or fast == []:
            continue
        fast_answers += 1
        assert fast == outcome(split_with_parser, mutated), mutated
    assert fast_answers > 300  # the comparison did happen
