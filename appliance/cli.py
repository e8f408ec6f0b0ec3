"""The `module-ingest` command line. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys

from appliance import __version__, app
from appliance.auth import provisioning
from appliance.auth.identity import KINDS, parse_channels
from appliance.auth.registry import Registry, RegistryError
from appliance.client import Client, ClientError
from appliance.config import ConfigError, parse_address
from appliance.config import load as load_config
from appliance.durable import fsync_dir
from appliance.errors import ToolError
from appliance.protocol.crypto import DEFAULT_MACS, MAC_ALGORITHMS, token_to_secret
from appliance.store import recover_dump, worker
from appliance.store.reader import read_records
from appliance.store.segment import json_line, record_json
from appliance.subscribers import export_cli, query_cli, runner
from appliance.telemetry import stats_cli
from hw import fingerprint

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    pass


def _registry(config) -> Registry:
    app.ensure_data_dir(config.data_dir)
    registry = Registry(app.registry_path(config.data_dir))
    registry.load()
    return registry


def cmd_serve(args, config) -> int:
    runner.check_subscribers(config)  # before anything starts: a bad table is one line
    return app.build(config).run()


def cmd_config_show(args, config) -> int:
    runner.check_subscribers(config)
    sys.stdout.write(config.to_toml(secrets=args.secrets))
    return 0


def _mac_list(text: str) -> list[str]:
    macs = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in macs if m not in MAC_ALGORITHMS]
    if unknown or not macs:
        raise CliError(f"--mac: expected some of {', '.join(MAC_ALGORITHMS)}, got {text!r}")
    return macs


def cmd_identity_add(args, config) -> int:
    registry = _registry(config)
    token = registry.add(
        args.id,
        args.kind,
        module=args.module,
        channels=parse_channels(args.channels) if args.channels else (),
        fingerprint=args.fingerprint,
        macs=_mac_list(args.mac) if args.mac else DEFAULT_MACS,
        admin=args.admin,
    )
    identity = registry.get(args.id)
    print(json.dumps({**_public(identity), "token": token}))
    return 0


def _public(identity) -> dict:
    return {
        "id": identity.id,
        "kind": identity.kind,
        "module": identity.module,
        "channels": sorted(identity.channels),
        "fingerprint": identity.fingerprint,
        "mac": sorted(identity.macs),
        "admin": identity.admin,
        "revoked": identity.revoked,
    }


def cmd_identity_list(args, config) -> int:
    for identity in _registry(config).list():
        print(json.dumps(_public(identity)))
    return 0


def cmd_identity_revoke(args, config) -> int:
    _registry(config).revoke(args.id)
    print(json.dumps({"id": args.id, "revoked": True}))
    return 0


def cmd_identity_rotate(args, config) -> int:
    token = _registry(config).rotate(args.id)
    print(json.dumps({"id": args.id, "token": token}))
    return 0


def cmd_identity_restore(args, config) -> int:
    token = _registry(config).restore(args.id)
    print(json.dumps({"id": args.id, "token": token}))
    return 0


def cmd_identity_bind(args, config) -> int:
    fingerprint = None if args.clear else args.fingerprint
    _registry(config).bind(args.id, fingerprint)
    print(json.dumps({"id": args.id, "fingerprint": fingerprint}))
    return 0


def cmd_identity_import(args, config) -> int:
    try:
        fmt = provisioning.format_for(args.file, args.format)
        with open(args.file, encoding="utf-8-sig", newline="") as f:  # a BOM from Excel
            specs, rows = provisioning.read_specs(f, fmt)
    except provisioning.ProvisioningError as exc:
        raise CliError(f"import: {args.file}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"import: {args.file}: cannot read: {_reason(exc)}") from None
    # Created before the registry changes, so a name that is taken changes nothing.
    out = _create_private(args.tokens_out) if args.tokens_out else None
    try:
        tokens = _add_rows(config, args.file, specs, rows)
    except BaseException:
        if out is not None:
            out.close()
            os.unlink(args.tokens_out)
        raise
    lines = "".join(json.dumps({"id": i, "token": t}) + "\n" for i, t in tokens.items())
    if out is None:
        sys.stdout.write(lines)
        return 0
    try:
        with out:
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
        fsync_dir(os.path.dirname(os.path.abspath(args.tokens_out)))
    except OSError as exc:
        raise CliError(
            f"import: {len(tokens)} identities were added, but their tokens could not be "
            f"written to {args.tokens_out} ({_reason(exc)}): rotate them"
        ) from None
    print(json.dumps({"imported": len(tokens), "tokens": args.tokens_out}))
    return 0


def _add_rows(config, path: str, specs: list[dict], rows: list[int]) -> dict[str, str]:
    """Registry.add_many, its error naming the row at fault."""
    try:
        return _registry(config).add_many(specs)
    except RegistryError as exc:
        where = f"row {rows[exc.index]}: " if exc.index is not None else ""
        raise CliError(f"import: {path}: {where}{exc}") from None


def cmd_identity_export(args, config) -> int:
    provisioning.write_identities(sys.stdout, _registry(config).list(), args.format)
    return 0


def _create_private(path: str):
    """A new file only its owner can read: never an existing file, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise CliError(f"{path}: cannot create: {_reason(exc)}") from None
    return os.fdopen(fd, "w", encoding="utf-8")


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def cmd_send(args, config) -> int:
    try:
        address = parse_address(args.connect) if args.connect else config.listen
        token = _send_token(args.token_file)
        token_to_secret(token)
    except ValueError as exc:
        raise CliError(f"send: {exc}") from None
    tls = None
    if args.tls_ca:
        tls = ssl.create_default_context(cafile=args.tls_ca)
    lines = open(args.file, "rb") if args.file else sys.stdin.buffer  # noqa: SIM115
    count = 0
    with (
        lines,
        Client(
            address.host,
            address.port,
            args.id,
            token,
            mac=args.mac,
            tls=tls,
            timeout=args.timeout,
            fingerprint=args.fingerprint,
        ) as client,
    ):
        for line in lines:
            try:
                client.send(args.channel, line.rstrip(b"\r\n"))
            except ValueError as exc:
                raise CliError(f"send: line {count + 1}: {exc}") from None
            count += 1
        client.flush()
        rejected = list(client.rejected)
        acked = client.acked
    for seq, code, message in rejected:
        print(f"module-ingest: frame {seq} rejected: {code} {message}", file=sys.stderr)
    print(json.dumps({"sent": count, "acked_seq": acked, "rejected": len(rejected)}))
    return EXIT_FAILED if rejected else 0


TOKEN_ENV = "MODULE_INGEST_TOKEN"
TOKEN_FILE_MAX = 4096  # a token is 43 characters; a credentials JSON file a few more


def _send_token(token_file: str | None) -> str:
    """The token from --token-file, else from $MODULE_INGEST_TOKEN. Never from the
    command line, which every local user can read (ps, /proc/PID/cmdline)."""
    if not token_file:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise CliError(f"send: give --token-file FILE or set {TOKEN_ENV}")
        return token
    try:
        with open(token_file, "rb") as f:
            data = f.read(TOKEN_FILE_MAX + 1)
    except OSError as exc:
        raise CliError(f"send: --token-file {token_file}: {_reason(exc)}") from None
    if len(data) > TOKEN_FILE_MAX:
        raise CliError(f"send: --token-file {token_file}: too large for a token")
    text = data.decode("utf-8", "replace").strip()
    if text.startswith("{"):  # a credentials file, like data/dev-credentials.json
        try:
            text = json.loads(text)["token"]
        except (ValueError, KeyError, TypeError):
            raise CliError(f"send: --token-file {token_file}: no token in it") from None
        if not isinstance(text, str):
            raise CliError(f"send: --token-file {token_file}: no token in it")
    return text


def cmd_dump(args, config) -> int:
    directory = app.wal_dir(config.data_dir)
    if not directory.is_dir():
        raise CliError(f"dump: no store at {directory}")
    out = sys.stdout
    for rec in read_records(directory):
        if args.identity is not None and rec.identity != args.identity:
            continue
        if args.channel is not None and rec.channel != args.channel:
            continue
        if args.since_seq is not None and rec.seq < args.since_seq:
            continue
        out.write(json_line(record_json(rec)))
    out.flush()
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """Usage errors in one line, like every other failure."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def _channel(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"a channel is 0..65535, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="module-ingest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"module-ingest {__version__}")
    parser.add_argument("--config", help="config file (default: $MODULE_INGEST_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the daemon")
    # also after the command, as the README shows it; SUPPRESS keeps one given before it
    p.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective config (credentials hidden)")
    show.add_argument(
        "--secrets", action="store_true", help="print credentials too (passwords, secret keys)"
    )
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("identity", help="manage identities (users, modules, cores)")
    isub = p.add_subparsers(dest="identity_command", required=True)
    a = isub.add_parser("add", help="add an identity; prints its token once")
    a.add_argument("id")
    a.add_argument("--kind", choices=KINDS, required=True)
    a.add_argument("--module", help="the module a core belongs to")
    a.add_argument("--channels", help="channels it may write (users: read), e.g. 1,2,5-7")
    a.add_argument("--fingerprint", help="bind to this hardware fingerprint")
    a.add_argument("--mac", help="allowed MAC algorithms (default: hmac-sha256,blake2s)")
    a.add_argument("--admin", action="store_true", help="users: may administer")
    a.set_defaults(func=cmd_identity_add)
    isub.add_parser("list", help="list identities (never secrets)").set_defaults(
        func=cmd_identity_list
    )
    r = isub.add_parser("revoke", help="revoke an identity; its connection is closed")
    r.add_argument("id")
    r.set_defaults(func=cmd_identity_revoke)
    r = isub.add_parser("rotate", help="give an identity a new token (printed once)")
    r.add_argument("id")
    r.set_defaults(func=cmd_identity_rotate)
    r = isub.add_parser("restore", help="make a revoked identity active, with a new token")
    r.add_argument("id")
    r.set_defaults(func=cmd_identity_restore)
    b = isub.add_parser("bind", help="bind an identity to a hardware fingerprint, or clear it")
    b.add_argument("id")
    how = b.add_mutually_exclusive_group(required=True)
    how.add_argument("--fingerprint", help="the fingerprint (replaces any binding)")
    how.add_argument("--clear", action="store_true", help="remove the binding")
    b.set_defaults(func=cmd_identity_bind)
    m = isub.add_parser("import", help="add identities from a CSV or JSON-lines file")
    m.add_argument("file")
    m.add_argument("--tokens-out", help="write the new tokens here (a new file, 0600)")
    m.add_argument("--format", choices=provisioning.FORMATS, help="default: by extension")
    m.set_defaults(func=cmd_identity_import)
    e = isub.add_parser("export", help="print every identity's settings (never a secret)")
    e.add_argument("--format", choices=provisioning.FORMATS, default="csv")
    e.set_defaults(func=cmd_identity_export)

    p = sub.add_parser("send", help="send stdin lines (or --file lines) as DATA frames")
    p.add_argument("--id", required=True)
    p.add_argument("--token-file", help=f"file holding the token (default: ${TOKEN_ENV})")
    p.add_argument("--channel", type=_channel, required=True)
    p.add_argument("--file")
    p.add_argument("--connect", help="host:port (default: server.listen of the config)")
    p.add_argument("--mac", choices=MAC_ALGORITHMS, default="hmac-sha256")
    p.add_argument("--fingerprint", default="", help='hardware fingerprint, or "auto"')
    p.add_argument("--tls-ca", help="connect with TLS, trusting this CA file")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("dump", help="print stored frames as JSON lines")
    p.add_argument("--identity")
    p.add_argument("--channel", type=_channel)
    p.add_argument("--since-seq", type=int, help="only frames with seq >= N")
    p.set_defaults(func=cmd_dump)
    stats_cli.add_parser(sub)
    recover_dump.add_parser(sub)
    worker.add_parser(sub)
    fingerprint.add_parser(sub)
    runner.add_parser(sub)
    export_cli.add_parser(sub)
    query_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except (ConfigError, RegistryError, CliError, ToolError) as exc:
        print(f"module-ingest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        sys.stderr.close()  # `dump | head` is not an error
        return 0
    except KeyboardInterrupt:
        return 130
    except (ClientError, OSError) as exc:
        print(f"module-ingest: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
