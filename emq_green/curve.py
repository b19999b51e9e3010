"""CURVE transport security: certificates, socket options, ``emq-green-keys``.

CurveZMQ authenticates both ends of a link and encrypts it. The router is
the CURVE *server* on all three of its sockets; workers and clients are
CURVE *clients*: they hold a key pair of their own and the router's public
key. Which client keys get in is decided by the ZAP handler
(:mod:`emq_green.router.zap`) against a directory of public certificates.

Keys live in ``zmq.auth`` certificate files, so certificates made by pyzmq's
own tools work too: ``NAME.key`` holds the public key, ``NAME.key_secret``
the public and the secret key (it must stay private: mode 0600).

Everything here is opt-in: with no key settings no socket option is set and
the wire is plain eMQP/1.0, as EventMQ 0.3.13 speaks it. ``inproc://`` links
(the job manager inside ``emq-green --standalone``) never use CURVE: libzmq
does not run a security handshake over ``inproc``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import zmq
import zmq.auth
import zmq.utils.z85

logger = logging.getLogger("emq_green.curve")

#: the ZAP domain the router's sockets ask about (logged; all are checked alike)
ZAP_DOMAIN = "emq-green"
ENV_SECRET_KEY_FILE = "EVENTMQ_CURVE_SECRET_KEY_FILE"
ENV_SERVER_KEY_FILE = "EVENTMQ_CURVE_SERVER_KEY_FILE"


class CurveError(OSError):
    """CURVE cannot be set up as configured (missing support, a bad or missing
    certificate, a server key without an authorized-keys directory). An
    ``OSError``, so the console scripts report it as they report a socket
    that cannot bind."""


def require_curve() -> None:
    """Raise :class:`CurveError` when libzmq was built without CURVE."""
    if not zmq.has("curve"):
        raise CurveError(
            f"CURVE is configured, but this libzmq ({zmq.zmq_version()}) was built without "
            "CURVE support (libsodium); install a pyzmq wheel, which has it")


@dataclass(frozen=True)
class KeyPair:
    """A public and secret key, Z85-encoded (40 characters each)."""

    public: bytes
    secret: bytes


def _key(path: str, which: str, text: bytes) -> bytes:
    """``text`` if it is a CURVE key (40 Z85 characters: 32 bytes), else
    CurveError naming the file (a probe: one character cut passed, and
    ZeroMQ's EINVAL came later, a traceback in every program, a scheduler
    alive and never connected)."""
    try:
        if len(text) == 40 and len(zmq.utils.z85.decode(text)) == 32:
            return text
    except (ValueError, KeyError, IndexError, TypeError, struct.error):
        pass  # (struct.error: 40 Z85 characters whose groups pass 2**32, a probe)
    raise CurveError(f"{path}: its {which} key is not a CURVE key (40 Z85 characters); "
                     "make the pair again with emq-green-keys")


def load_public_key(path: str) -> bytes:
    """The public key of the certificate at ``path`` (either file of a pair)."""
    try:
        public, _secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read the CURVE certificate {path}: {exc}") from None
    if not public:
        raise CurveError(f"{path} holds no public key (not a zmq.auth certificate)")
    return _key(path, "public", public)


def load_key_pair(path: str) -> KeyPair:
    """The key pair of the secret certificate at ``path`` (``NAME.key_secret``)."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read the CURVE certificate {path}: {exc}") from None
    if not public or not secret:
        raise CurveError(f"{path} holds no secret key: give the NAME.key_secret file "
                         "written by emq-green-keys (or zmq.auth.create_certificates)")
    public, secret = _key(path, "public", public), _key(path, "secret", secret)
    if zmq.curve_public(secret) != public:
        # (a probe: refused only at the handshake, with hints pointing elsewhere)
        raise CurveError(f"{path}: its public key is not the one of its secret key (two "
                         "certificates mixed?); make the pair again with emq-green-keys")
    try:
        if os.stat(path).st_mode & 0o077:
            logger.warning("%s: the secret key is readable by other users (mode %o); "
                           "chmod 600 it", path, os.stat(path).st_mode & 0o777)
    except OSError:
        pass
    return KeyPair(public, secret)


def fingerprint(public_key: bytes) -> str:
    """How a key is named in logs: its Z85 text, as in its ``.key`` file (a
    public key is no secret; ``grep -r`` finds its certificate)."""
    if len(public_key) == 32:
        public_key = zmq.utils.z85.encode(public_key)
    return public_key.decode("ascii", "replace")


@dataclass(frozen=True)
class ClientCurve:
    """What a worker or client needs: its own key pair and the router's public key."""

    keys: KeyPair
    server_key: bytes

    @classmethod
    def from_files(cls, secret_key_file: str, server_key_file: str) -> ClientCurve:
        require_curve()
        return cls(load_key_pair(secret_key_file), load_public_key(server_key_file))

    def apply(self, socket: Any) -> None:
        """Set the CURVE options on ``socket``; call before ``connect``."""
        socket.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)


def client_curve(secret_key_file: str, server_key_file: str, addr: str = "",
                 *, who: str = "") -> Optional[ClientCurve]:
    """The CURVE setup for a link to ``addr``, or None for a plain link.

    None when neither file is given, or when ``addr`` is ``inproc://``. Only
    one of the two files is an error: half a configuration would silently
    connect in plain text to a router that then refuses it.
    """
    if addr.startswith("inproc://") or not (secret_key_file or server_key_file):
        return None
    prefix = f"{who}: " if who else ""
    if not secret_key_file:
        raise CurveError(f"{prefix}curve_server_key_file is set but curve_secret_key_file "
                         "is not: a CURVE client needs a key pair of its own")
    if not server_key_file:
        raise CurveError(f"{prefix}curve_secret_key_file is set but curve_server_key_file "
                         "is not: a CURVE client needs the router's public key")
    return ClientCurve.from_files(secret_key_file, server_key_file)


def client_curve_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[ClientCurve]:
    """:func:`client_curve` from ``EVENTMQ_CURVE_SECRET_KEY_FILE`` and
    ``EVENTMQ_CURVE_SERVER_KEY_FILE`` (the client's defaults)."""
    env = os.environ if environ is None else environ
    return client_curve(env.get(ENV_SECRET_KEY_FILE, ""), env.get(ENV_SERVER_KEY_FILE, ""),
                        who="client (environment)")


@dataclass(frozen=True)
class ServerCurve:
    """The router's side: its key pair and the directory of keys allowed in."""

    keys: KeyPair
    authorized_keys: str

    def apply(self, socket: Any) -> None:
        """Make ``socket`` a CURVE server; call before ``bind``."""
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def server_curve(secret_key_file: str, authorized_keys: str) -> Optional[ServerCurve]:
    """The router's CURVE setup from its ``curve_secret_key_file`` and
    ``curve_authorized_keys`` settings, or None when it has no secret key (plain).

    A secret key without an authorized-keys directory is refused: CURVE with
    no ZAP check lets any key pair in, which only looks secure."""
    if not secret_key_file:
        if authorized_keys:
            raise CurveError("router: curve_authorized_keys is set but curve_secret_key_file "
                             "is not: the router would run without CURVE")
        return None
    require_curve()
    if not authorized_keys:
        raise CurveError("router: curve_secret_key_file is set but curve_authorized_keys is "
                         "not: refusing to start, since CURVE without a directory of "
                         "authorized public keys would let any key in")
    if not os.path.isdir(authorized_keys):
        raise CurveError(f"router: curve_authorized_keys {authorized_keys} is not a directory")
    return ServerCurve(load_key_pair(secret_key_file), authorized_keys)


# ----------------------------------------------------------------------
# emq-green-keys

def create_key_pair(directory: str, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``directory/name.key`` (public, mode 0644) and
    ``directory/name.key_secret`` (mode 0600) in ``zmq.auth``'s format.

    The pair is written in a private temporary directory inside
    ``directory`` and renamed into place, so the secret file is never
    readable by others, not even for a moment."""
    require_curve()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}: a plain file name is needed")
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    public, secret = target / f"{name}.key", target / f"{name}.key_secret"
    if not force:
        for path in (public, secret):
            if path.exists():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    staging = Path(tempfile.mkdtemp(prefix=".emq-green-keys-", dir=target))
    try:
        made_public, made_secret = zmq.auth.create_certificates(str(staging), name)
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return public, secret


def keys_main(argv: Optional[Sequence[str]] = None) -> int:
    """``emq-green-keys [--dir DIR] NAME...``: make CURVE key pairs."""
    parser = argparse.ArgumentParser(
        prog="emq-green-keys",
        description="Write CURVE certificates (zmq.auth format): DIR/NAME.key (public: "
                    "give it to the peers) and DIR/NAME.key_secret (secret, mode 0600: "
                    "keep it on the host that uses it).")
    parser.add_argument("names", nargs="+", metavar="NAME", help="one key pair per name")
    parser.add_argument("--dir", default=".", help="directory to write to (default: .)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    ns = parser.parse_args(argv)
    try:
        for name in ns.names:
            public, secret = create_key_pair(ns.dir, name, force=ns.force)
            print(f"{name}: public {public}, secret {secret} "
                  f"(key {fingerprint(load_public_key(str(public)))})")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"emq-green-keys: {exc}\n")
        return 1
    return 0


__all__ = ["ClientCurve", "CurveError", "KeyPair", "ServerCurve", "ZAP_DOMAIN",
           "client_curve", "client_curve_from_env",
           "create_key_pair", "fingerprint", "keys_main", "load_key_pair", "load_public_key",
           "require_curve", "server_curve"]
