"""Ed25519 signatures of model files: who wrote a model, checked before it is used.

The fingerprint of a model file (see :mod:`anomaly_dask.model_file`) is an unkeyed sha256
of its config and tensors: it detects accidental corruption, but anyone can recompute it
after editing a file. A signature made with a private key over that fingerprint proves
that the holder of the key wrote exactly this content. Loading with ``trusted_keys``
refuses any file that is not signed by one of those keys.

What is signed is the text ``anomaly_dask.model\\0<format version>\\0<fingerprint>``, so a
signature cannot be moved to a file of another format or version. The signature is stored
in the file's metadata next to the fingerprint and is not part of the fingerprint's input.

Keys are PEM files: an unencrypted PKCS#8 private key (written with mode 0600) and a
SubjectPublicKeyInfo public key, as written by :func:`write_keypair` (``anomaly-dask
keygen``). A key is named by :func:`key_id`, the first 16 hex digits of the sha256 of its
raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ModelFileError, ParameterError

__all__ = [
    "KEY_ID_LENGTH",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_fingerprint",
    "verify_fingerprint",
    "write_keypair",
]

#: Hex digits of a key id (see :func:`key_id`).
KEY_ID_LENGTH = 16

#: Size of an Ed25519 signature, bytes.
_SIGNATURE_BYTES = 64

#: Largest key file read, bytes (a PEM Ed25519 key is about 120 bytes).
_MAX_KEY_BYTES = 64 * 1024


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short name of a key: sha256 of the raw public key, first 16 hex digits.

    Parameters
    ----------
    key : Ed25519PublicKey or Ed25519PrivateKey
        A private key is named by its public half.

    Returns
    -------
    str
    """
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_LENGTH]


def _message(format_name: str, format_version: int, fingerprint: str) -> bytes:
    return f"{format_name}\0{format_version}\0{fingerprint}".encode()


def _read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > _MAX_KEY_BYTES:
            raise ParameterError(f"{what} {os.fspath(path)!r} is {size} bytes, too large to be a PEM key")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise ParameterError(f"{what} {os.fspath(path)!r} does not exist") from err
    except IsADirectoryError as err:
        raise ParameterError(f"{what} {os.fspath(path)!r} is a folder, not a PEM key file") from err


def load_private_key(key: str | os.PathLike[str] | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8), or the key itself.

    Parameters
    ----------
    key : str, path-like or Ed25519PrivateKey

    Returns
    -------
    Ed25519PrivateKey

    Raises
    ------
    ParameterError
        No such file, not a PEM private key, encrypted, or not an Ed25519 key.
    """
    if isinstance(key, Ed25519PrivateKey):
        return key
    if not isinstance(key, (str, os.PathLike)):
        raise ParameterError(
            f"signing_key={key!r} must be the path of a PEM private key or an Ed25519PrivateKey"
        )
    data = _read_pem(key, "signing key")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:  # encrypted, but no password given
        raise ParameterError(
            f"signing key {os.fspath(key)!r} is encrypted; use an unencrypted key (anomaly-dask keygen)"
        ) from err
    except ValueError as err:
        raise ParameterError(f"signing key {os.fspath(key)!r} is not a PEM private key ({err})") from err
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ParameterError(
            f"signing key {os.fspath(key)!r} is a {type(loaded).__name__}, not an Ed25519 key"
        )
    return loaded


def load_public_key(key: str | os.PathLike[str] | Ed25519PublicKey | Ed25519PrivateKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, a public key, or a private key's public half.

    Parameters
    ----------
    key : str, path-like, Ed25519PublicKey or Ed25519PrivateKey

    Returns
    -------
    Ed25519PublicKey

    Raises
    ------
    ParameterError
        No such file, not a PEM public key, or not an Ed25519 key.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if not isinstance(key, (str, os.PathLike)):
        raise ParameterError(
            f"trusted key {key!r} must be the path of a PEM public key or an Ed25519PublicKey"
        )
    data = _read_pem(key, "trusted key")
    try:
        loaded = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise ParameterError(
            f"trusted key {os.fspath(key)!r} is not a PEM public key ({err}); pass the .pub.pem "
            f"file written by anomaly-dask keygen"
        ) from err
    if not isinstance(loaded, Ed25519PublicKey):
        raise ParameterError(f"trusted key {os.fspath(key)!r} is a {type(loaded).__name__}, not an Ed25519 key")
    return loaded


def write_keypair(prefix: str | os.PathLike[str]) -> tuple[str, str, str]:
    """Generate an Ed25519 key pair into ``<prefix>.pem`` (private) and ``<prefix>.pub.pem``.

    The private key is created with mode 0600 and neither file may exist beforehand (an
    existing key is never overwritten).

    Parameters
    ----------
    prefix : str or path-like
        Local path without extension.

    Returns
    -------
    private_path, public_path, key_id : str

    Raises
    ------
    ParameterError
        One of the files exists already, or its folder does not.
    """
    base = os.fspath(prefix)
    private_path, public_path = base + ".pem", base + ".pub.pem"
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise ParameterError(f"{path} exists already; remove it or choose another prefix")
    folder = os.path.dirname(private_path) or "."
    if not os.path.isdir(folder):
        raise ParameterError(f"folder {folder!r} of the key files does not exist")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    os.chmod(private_path, 0o600)  # whatever the umask
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(public_pem)
    return private_path, public_path, key_id(key)


def sign_fingerprint(
    key: Ed25519PrivateKey, format_name: str, format_version: int, fingerprint: str
) -> dict[str, str]:
    """Metadata entries ``signature`` (hex) and ``signer`` (key id) for a model's fingerprint."""
    signature = key.sign(_message(format_name, format_version, fingerprint))
    return {"signature": signature.hex(), "signer": key_id(key)}


def _parse_signature(meta: dict[str, Any], url: str) -> tuple[bytes, str] | None:
    """The signature bytes and signer id from the metadata; None when unsigned."""
    signature, signer = meta.get("signature"), meta.get("signer")
    if signature is None and signer is None:
        return None
    if not isinstance(signature, str) or not isinstance(signer, str):
        raise ModelFileError(f"{url}: model file has an incomplete signature (signature and signer go together)")
    try:
        raw = bytes.fromhex(signature)
    except ValueError:
        raw = b""
    if len(raw) != _SIGNATURE_BYTES:
        raise ModelFileError(f"{url}: model file signature is malformed (not {_SIGNATURE_BYTES} hex-encoded bytes)")
    if len(signer) != KEY_ID_LENGTH or any(c not in "0123456789abcdef" for c in signer):
        raise ModelFileError(f"{url}: model file signer {signer[:40]!r} is not a key id")
    return raw, signer


def verify_fingerprint(
    meta: dict[str, Any],
    trusted_keys: Iterable[Any] | None,
    format_name: str,
    format_version: int,
    fingerprint: str,
    url: str,
) -> str | None:
    """Check a model file's signature against the trusted keys.

    Without trusted keys a signature is optional; one that is present must still be well
    formed. With trusted keys the file must be signed by one of them, over ``fingerprint``.

    Parameters
    ----------
    meta : dict
        The file's ``__metadata__``.
    trusted_keys : iterable or None
        PEM public key paths or key objects (see :func:`load_public_key`); None: no
        signature required (an empty iterable is refused: it would trust nothing).
    format_name, format_version, fingerprint : str, int, str
        What the signature must cover (the fingerprint already verified against the content).
    url : str
        For messages.

    Returns
    -------
    str or None
        The id of the trusted key that signed the file; None when no keys were given.

    Raises
    ------
    ModelFileError
        Unsigned, signed by a key not trusted, or a signature that does not verify.
    ParameterError
        A trusted key is unreadable, or ``trusted_keys`` is empty.
    """
    parsed = _parse_signature(meta, url)
    if trusted_keys is None:
        return None
    keys = [load_public_key(k) for k in trusted_keys]
    if not keys:
        raise ParameterError(
            "trusted_keys is empty: no model could be accepted; pass None to load without "
            "a signature check, or the public keys to trust"
        )
    by_id = {key_id(k): k for k in keys}
    if parsed is None:
        raise ModelFileError(
            f"{url}: model file is not signed, and trusted keys {sorted(by_id)} were given; "
            f"only models signed by one of them are loaded (save with signing_key= / "
            f"train --signing-key)"
        )
    signature, signer = parsed
    if signer not in by_id:
        raise ModelFileError(
            f"{url}: model file is signed by key {signer}, which is not among the trusted keys "
            f"{sorted(by_id)}; do not use it unless you trust that key"
        )
    try:
        by_id[signer].verify(signature, _message(format_name, format_version, fingerprint))
    except InvalidSignature:
        raise ModelFileError(
            f"{url}: model file signature does not verify with trusted key {signer}: the file was "
            f"modified after it was signed; do not use it"
        ) from None
    return signer
