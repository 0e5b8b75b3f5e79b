"""``lloom-client``: ask the network a question from the command line.

Finds executors for the model through the validators, ranks them and picks one as the
gateway does (the client library :mod:`lloom.client.network`), sends the request and
streams the answer to stdout; diagnostics go to stderr. If an executor fails before its
first token, the next one is tried; if it fails mid-answer, the answer is continued on
another where it can be reproduced (temperature 0 or a seed).
"""

from __future__ import annotations

from lloom.coldstart import FrozenImports

# The collector would traverse py-libp2p's objects over and over while it is imported, and
# again at exit (lloom.coldstart): paused for these imports, and what they made frozen.
with FrozenImports():
    import argparse
    import json
    import logging
    import sys
    from typing import Any

    import trio

    from lloom import __version__
    from lloom.cli.common import (
        EXIT_OK,
        add_identity_args,
        identity_from_args,
        run_main,
    )
    from lloom.cli.node_args import add_node_args, settings_from_args
    from lloom.client.network import NetworkClient
    from lloom.client.observed import EXECUTOR_BOOK, ExecutorBook
    from lloom.client.options import (
        add_chain_args,
        add_choice_args,
        choice_from_args,
        domain_from_args,
    )
    from lloom.client.receipts import Ledger, ReceiptSigner
    from lloom.client.session import Result
    from lloom.errors import (
        LloomError,
        NetworkError,
        PartialResponseError,
        UsageError,
    )
    from lloom.identity import Identity
    from lloom.logs import configure_logging
    from lloom.node.node import open_node
    from lloom.protocol import llm, openai_body

logger = logging.getLogger("lloom.client")

#: Exit codes of ``lloom-client`` (documented in docs/client.md).
EXIT_CODES = {
    "ok": 0,
    "failure": 1,
    "usage": 2,
    "no_executor": 3,
    "all_failed": 4,
    "timeout": 5,
    "partial": 6,
    "rejected": 7,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lloom-client``."""
    parser = argparse.ArgumentParser(
        prog="lloom-client", description="Send a prompt to the lloom network."
    )
    add_identity_args(parser)
    add_chain_args(parser)
    add_choice_args(parser)
    add_node_args(parser, "client")
    parser.add_argument("--model", required=True, help="network model id")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", help="a system message sent before the prompt")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="completion token limit")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature")
    parser.add_argument(
        "--seed", type=int, metavar="N", help="sampling seed (with it, a broken-off answer resumes)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="overall timeout"
    )
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with text, usage, executor"
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: libp2p too)"
    )
    parser.add_argument("--version", action="version", version=f"lloom {__version__}")
    return parser


def request_from_args(args: argparse.Namespace) -> llm.Request:
    """The chat request the flags describe (validated)."""
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    body: dict[str, Any] = {"model": args.model, "messages": messages, "stream": not args.no_stream}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.seed is not None:
        body["seed"] = args.seed
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return llm.Request(llm.RequestKind.CHAT, openai_body.normalize_chat_body(body))


async def ask(identity: Identity, args: argparse.Namespace, request: llm.Request) -> Result:
    """Discover, order, send with failover; stream text to stdout unless ``--json``."""
    settings = settings_from_args(args, "client")
    config = settings.node_config()
    printing = not args.json
    texts: list[str] = []

    async def on_chunk(chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                texts.append(piece)
                if printing:
                    sys.stdout.write(piece)
                    sys.stdout.flush()

    with trio.fail_after(args.timeout):
        async with open_node(identity, config) as node:
            if config.bootstrap and not node.host.get_connected_peers():
                raise NetworkError("no bootstrap node reachable")
            book = ExecutorBook(settings.data_dir / EXECUTOR_BOOK)
            ledger = Ledger(settings.data_dir / "client-ledger.sqlite3")
            signer = ReceiptSigner(identity, ledger, domain_from_args(args))
            client = NetworkClient(
                node, signer, timeout=args.timeout, choice=choice_from_args(args, book)
            )
            try:
                result = await client.run(request, on_chunk)
            finally:
                await client.pool.close()
                ledger.close()
                book.save()
            if signer.last_refusal:
                print(
                    f"warning: refused to sign the executor's usage: {signer.last_refusal}",
                    file=sys.stderr,
                )
    if result.response is not None:
        text = "".join(
            str((c.get("message") or {}).get("content") or "")
            for c in result.response.get("choices") or []
        )
    else:
        text = "".join(texts)
    if args.json:
        print(
            json.dumps(
                {
                    "text": text,
                    "model": result.end.model,
                    "executor": str(result.executor),
                    "path": result.path,
                    "request_id": result.end.request_id,
                    "usage": result.billed.to_json(),
                    "resumes": result.resumes,
                    "backend_usage": (
                        None
                        if result.end.backend_usage is None
                        else result.end.backend_usage.to_json()
                    ),
                }
            )
        )
    else:
        if result.response is not None:
            sys.stdout.write(text)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return result


def exit_code_for(exc: LloomError) -> int:
    """The documented exit code for a failure (it lives on the error's class)."""
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run ``lloom-client`` with ``argv``; return the exit code.

    ``lloom-client gateway ...`` runs the OpenAI-compatible gateway instead.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        from lloom.gateway.cli import main as gateway_main  # noqa: PLC0415 - keeps the CLI light

        return gateway_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        request = request_from_args(args)
        identity = identity_from_args(args, role="client")
        trio.run(ask, identity, args, request)
    except trio.TooSlowError:
        print(f"\nerror: no answer within {args.timeout:g} s", file=sys.stderr)
        return EXIT_CODES["timeout"]
    except LloomError as exc:
        prefix = "\n" if isinstance(exc, PartialResponseError) else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


def run() -> None:
    """Console-script entry point."""
    run_main(main)
