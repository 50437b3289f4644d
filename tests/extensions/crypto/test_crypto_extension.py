"""Crypto extension: AES-256-GCM layout and interop, tamper detection, PBKDF2, errors."""

from __future__ import annotations

import hashlib
import inspect
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from converge.errors import (
    CryptoError,
    CryptoTypeError,
    CryptoValueError,
    DecryptionError,
)
from converge.extensions.crypto import (
    CHUNK_SIZE,
    INLINE_LIMIT,
    adecrypt,
    aderive_key,
    aencrypt,
    decrypt,
    derive_key,
    encrypt,
    secure_random_bytes,
)
from loop_stall import assert_loop_stall_below

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

# -- seed signatures -----------------------------------------------------------------------


def test_signatures_match_the_seed() -> None:
    assert str(inspect.signature(encrypt)) == (
        "(plaintext: 'bytes', key: 'bytes', associated_data: 'bytes | None' = None) -> 'bytes'"
    )
    assert str(inspect.signature(decrypt)) == (
        "(ciphertext: 'bytes', key: 'bytes', associated_data: 'bytes | None' = None) -> 'bytes'"
    )
    assert str(inspect.signature(derive_key)) == (
        "(password: 'str', salt: 'bytes', length: 'int' = 32, iterations: 'int' = 100000)"
        " -> 'bytes'"
    )
    assert str(inspect.signature(secure_random_bytes)) == "(n: 'int') -> 'bytes'"


# -- AES-256-GCM ---------------------------------------------------------------------------


def test_blob_is_nonce_ciphertext_tag() -> None:
    blob = encrypt(b"hello", KEY)
    assert len(blob) == 12 + 5 + 16
    assert decrypt(blob, KEY) == b"hello"


def test_nonces_are_fresh_for_every_call() -> None:
    blobs = {encrypt(b"same", KEY)[:12] for _ in range(200)}
    assert len(blobs) == 200


def test_raw_aesgcm_opens_our_blobs() -> None:
    blob = encrypt(b"interop", KEY, b"aad")
    assert AESGCM(KEY).decrypt(blob[:12], blob[12:], b"aad") == b"interop"


def test_we_open_raw_aesgcm_blobs() -> None:
    nonce = bytes(12)
    blob = nonce + AESGCM(KEY).encrypt(nonce, b"interop", None)
    assert decrypt(blob, KEY) == b"interop"


def test_nist_gcm_test_vector_decrypts() -> None:
    # NIST GCM spec test case 16 (AES-256, 60-byte plaintext, 20-byte AAD).
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    nonce = bytes.fromhex("cafebabefacedbaddecaf888")
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    plaintext = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    ciphertext = bytes.fromhex(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
    )
    tag = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")
    assert decrypt(nonce + ciphertext + tag, key, aad) == plaintext


@given(st.binary(max_size=2048), st.one_of(st.none(), st.binary(max_size=64)))
def test_round_trip_any_plaintext_and_aad(plaintext: bytes, aad: bytes | None) -> None:
    assert decrypt(encrypt(plaintext, KEY, aad), KEY, aad) == plaintext


def test_bytes_like_inputs_are_accepted() -> None:
    blob = encrypt(bytearray(b"abc"), memoryview(KEY), bytearray(b"x"))
    assert decrypt(memoryview(blob), bytearray(KEY), b"x") == b"abc"


def test_every_single_bit_flip_is_rejected() -> None:
    blob = encrypt(b"sixteen byte msg", KEY, b"ctx")
    for bit in range(len(blob) * 8):
        damaged = bytearray(blob)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptionError):
            decrypt(bytes(damaged), KEY, b"ctx")


def test_every_single_bit_flip_of_the_aad_is_rejected() -> None:
    blob = encrypt(b"payload", KEY, b"ctx")
    for bit in range(3 * 8):
        aad = bytearray(b"ctx")
        aad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptionError):
            decrypt(blob, KEY, bytes(aad))


@pytest.mark.parametrize("cut", [0, 1, 12, 27])
def test_truncated_blobs_are_rejected(cut: int) -> None:
    blob = encrypt(b"", KEY)
    with pytest.raises(DecryptionError, match="truncated"):
        decrypt(blob[:cut], KEY)


def test_truncating_the_tag_of_a_longer_blob_is_rejected() -> None:
    blob = encrypt(b"a longer message here", KEY)
    for cut in range(1, 17):
        with pytest.raises(DecryptionError):
            decrypt(blob[:-cut], KEY)


def test_wrong_key_and_missing_aad_are_rejected_without_leaking() -> None:
    blob = encrypt(b"the plaintext", KEY, b"aad")
    for args in [(OTHER_KEY, b"aad"), (KEY, None), (KEY, b"other")]:
        with pytest.raises(DecryptionError) as info:
            decrypt(blob, *args)
        message = str(info.value)
        assert "the plaintext" not in message
        assert KEY.hex() not in message
        assert repr(KEY) not in message


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33, 64])
def test_wrong_key_length_is_a_value_error(length: int) -> None:
    with pytest.raises(CryptoValueError, match="32 bytes") as info:
        encrypt(b"x", bytes(length))
    assert isinstance(info.value, ValueError)
    with pytest.raises(CryptoValueError):
        decrypt(bytes(40), bytes(length))


@pytest.mark.parametrize(
    ("call", "args"),
    [
        (encrypt, ("text", KEY)),
        (encrypt, (b"x", "k" * 32)),
        (encrypt, (b"x", KEY, "aad")),
        (decrypt, ("text" * 10, KEY)),
        (decrypt, (bytes(40), None)),
        (decrypt, (bytes(40), KEY, 5)),
    ],
)
def test_non_bytes_arguments_are_type_errors(call: Any, args: tuple[Any, ...]) -> None:
    with pytest.raises(CryptoTypeError) as info:
        call(*args)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, CryptoError)


# -- async twins ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "size", [0, 1000, INLINE_LIMIT, INLINE_LIMIT + 1, INLINE_LIMIT + 3 * CHUNK_SIZE + 7]
)
async def test_async_twins_interoperate_with_the_sync_functions(size: int) -> None:
    plaintext = secure_random_bytes(size)
    blob = await aencrypt(plaintext, KEY, b"aad")
    assert decrypt(blob, KEY, b"aad") == plaintext
    assert AESGCM(KEY).decrypt(blob[:12], blob[12:], b"aad") == plaintext
    assert await adecrypt(encrypt(plaintext, KEY, b"aad"), KEY, b"aad") == plaintext


@pytest.mark.anyio
async def test_async_decrypt_of_a_large_tampered_blob_is_rejected() -> None:
    blob = bytearray(await aencrypt(bytes(INLINE_LIMIT + 3 * CHUNK_SIZE), KEY))
    blob[INLINE_LIMIT] ^= 0x80
    with pytest.raises(DecryptionError):
        await adecrypt(bytes(blob), KEY)
    with pytest.raises(DecryptionError):
        await adecrypt(bytes(blob[:20]), KEY)
    with pytest.raises(DecryptionError):
        await adecrypt(encrypt(bytes(INLINE_LIMIT + 1), KEY), KEY, b"unexpected aad")


LARGE = 64 * 1024 * 1024


@pytest.mark.anyio
async def test_64_mib_async_encryption_never_stalls_the_loop_20_ms() -> None:
    # The final join used to run on the loop: 42-86 ms for 64 MiB.
    plaintext = secure_random_bytes(LARGE)
    blob = await aencrypt(plaintext, KEY, b"aad")
    await assert_loop_stall_below(lambda: aencrypt(plaintext, KEY, b"aad"))
    await assert_loop_stall_below(lambda: adecrypt(blob, KEY, b"aad"))
    assert await adecrypt(blob, KEY, b"aad") == plaintext


@pytest.mark.parametrize("call", [encrypt, decrypt])
def test_a_non_contiguous_memoryview_is_a_crypto_type_error(call: Any) -> None:
    strided = memoryview(bytes(range(64)))[::2]
    with pytest.raises(CryptoTypeError, match="contiguous"):
        call(strided, KEY)
    with pytest.raises(CryptoTypeError, match="contiguous"):
        call(encrypt(b"x" * 40, KEY), KEY, strided)


@pytest.mark.anyio
@pytest.mark.parametrize("size", [100, 2 * INLINE_LIMIT])
async def test_a_non_contiguous_memoryview_is_a_crypto_type_error_in_async_twins(
    size: int,
) -> None:
    strided = memoryview(bytes(2 * size))[::2]
    with pytest.raises(CryptoTypeError, match="contiguous"):
        await aencrypt(strided, KEY)  # type: ignore[arg-type]
    with pytest.raises(CryptoTypeError, match="contiguous"):
        await adecrypt(strided, KEY)  # type: ignore[arg-type]
    with pytest.raises(CryptoTypeError, match="contiguous"):
        await aencrypt(bytes(size), KEY, strided)  # type: ignore[arg-type]
    with pytest.raises(CryptoTypeError, match="contiguous"):
        await adecrypt(encrypt(bytes(size), KEY), KEY, strided)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_async_twins_validate_like_the_sync_ones() -> None:
    with pytest.raises(CryptoValueError):
        await aencrypt(b"x", b"short")
    with pytest.raises(CryptoTypeError):
        await adecrypt("nope", KEY)  # type: ignore[arg-type]
    with pytest.raises(CryptoValueError):
        await aderive_key("pw", b"salt", iterations=0)
    with pytest.raises(CryptoValueError, match="between 1 and 2147483647"):
        await aderive_key("pw", b"salt", iterations=2**31)  # hashlib raised OverflowError


def test_an_iteration_count_beyond_openssls_limit_is_a_value_error() -> None:
    with pytest.raises(CryptoValueError, match="between 1 and 2147483647"):
        derive_key("pw", b"salt", iterations=2**70)


# -- PBKDF2 --------------------------------------------------------------------------------


def test_rfc_7914_pbkdf2_hmac_sha256_vector() -> None:
    expected = bytes.fromhex(
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
    )
    assert derive_key("passwd", b"salt", length=64, iterations=1) == expected


@given(
    st.text(max_size=40),
    st.binary(min_size=1, max_size=32),
    st.integers(1, 80),
    st.integers(1, 50),
)
def test_derive_key_equals_hashlib(
    password: str, salt: bytes, length: int, iterations: int
) -> None:
    expected = hashlib.pbkdf2_hmac(
        "sha256", password.encode("utf-8", "surrogatepass"), salt, iterations, length
    )
    assert derive_key(password, salt, length, iterations) == expected


def test_derive_key_defaults_are_32_bytes_and_100000_iterations() -> None:
    expected = hashlib.pbkdf2_hmac("sha256", b"pw", b"0123456789abcdef", 100_000, 32)
    assert derive_key("pw", b"0123456789abcdef") == expected


@pytest.mark.anyio
async def test_aderive_key_runs_off_the_loop_and_matches() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        start = time.perf_counter()
        key = await aderive_key("pw", b"salt" * 4, iterations=200_000)
        elapsed = time.perf_counter() - start
        tg.cancel_scope.cancel()
    assert key == hashlib.pbkdf2_hmac("sha256", b"pw", b"salt" * 4, 200_000, 32)
    assert ticks >= min(5, int(elapsed / 0.01))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((5, b"salt"), CryptoTypeError),
        (("pw", "salt"), CryptoTypeError),
        (("pw", b""), CryptoValueError),
        (("pw", b"salt", 0), CryptoValueError),
        (("pw", b"salt", 32, 0), CryptoValueError),
        (("pw", b"salt", 32.0), CryptoTypeError),
        (("pw", b"salt", True), CryptoTypeError),
        (("pw", b"salt", 32, "1000"), CryptoTypeError),
    ],
)
def test_derive_key_argument_errors(args: tuple[Any, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        derive_key(*args)


# -- random --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 32, 1000])
def test_secure_random_bytes_length(n: int) -> None:
    assert len(secure_random_bytes(n)) == n


def test_secure_random_bytes_differ() -> None:
    assert secure_random_bytes(32) != secure_random_bytes(32)


def test_secure_random_bytes_argument_errors() -> None:
    with pytest.raises(CryptoValueError) as info:
        secure_random_bytes(-1)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CryptoValueError, match=r"sys\.maxsize"):
        secure_random_bytes(2**70)  # raised OverflowError from os.urandom
    for bad in [1.5, "8", None, True]:
        with pytest.raises(CryptoTypeError):
            secure_random_bytes(bad)  # type: ignore[arg-type]
