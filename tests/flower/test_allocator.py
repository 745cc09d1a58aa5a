"""fedssl_flower.allocator: which C allocator the ClientApp tasks run with. Real processes:
each choice is checked by what a Python started with its environment resolves."""

import subprocess

import pytest

from fedssl_flower import allocator
from tests.support import processes as P

JEMALLOC = P.VENV_BIN.parent / "lib" / "libjemalloc.so.2"  # where scripts/bootstrap.sh puts it


def _in_python(env: dict[str, str], call: str) -> str:
    """What `allocator.<call>` prints in a fresh Python started with `env`."""
    out = subprocess.run([str(P.VENV_BIN / "python"), "-c", f"from fedssl_flower import allocator; print(allocator.{call})"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def _active(env: dict[str, str]) -> str:
    return _in_python(env, "active()")


def test_auto_finds_the_bootstrapped_jemalloc_and_a_process_with_its_environment_allocates_with_it():
    assert JEMALLOC.is_file(), "scripts/bootstrap.sh installs jemalloc into the virtualenv"
    chosen = allocator.choose({})
    assert chosen == allocator.Allocator("jemalloc", str(JEMALLOC))
    env = chosen.environ(P.base_env(LD_PRELOAD="", MALLOC_CONF="narenas:1"))
    assert env["LD_PRELOAD"] == str(JEMALLOC) and env["MALLOC_CONF"] == "narenas:1"  # the operator's options stand
    assert "MALLOC_ARENA_MAX" not in env
    assert _active(env) == "jemalloc"
    assert _active(P.base_env()) == "glibc"
    assert allocator.choose({"FEDSSL_JEMALLOC_PATH": str(JEMALLOC), "FEDSSL_CLIENTAPP_ALLOCATOR": "jemalloc"}).path == str(JEMALLOC)


def test_glibc_limits_the_arenas_unless_the_operator_chose():
    chosen = allocator.choose({"FEDSSL_CLIENTAPP_ALLOCATOR": " GLIBC "})
    assert chosen == allocator.Allocator("glibc")
    assert chosen.environ({"PATH": "/bin"}) == {"PATH": "/bin", "MALLOC_ARENA_MAX": "2"}
    assert chosen.environ({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"
    assert allocator.limit_malloc_arenas({"MALLOC_ARENA_MAX": "8"}) is False
    assert _in_python(P.base_env(), "limit_malloc_arenas({})") == "True"  # glibc here: mallopt accepted the limit
    assert _in_python(P.base_env(LD_PRELOAD=str(JEMALLOC)), "limit_malloc_arenas({})") == "False"  # jemalloc: no glibc arenas


def test_auto_without_jemalloc_says_why_and_jemalloc_without_it_is_an_error(tmp_path, monkeypatch):
    nowhere = [tmp_path / "lib" / "libjemalloc.so.2", tmp_path / "usr" / "libjemalloc.so.2"]
    monkeypatch.setattr(allocator, "search_path", lambda: nowhere)
    chosen = allocator.choose({})
    assert chosen.name == "glibc" and f"libjemalloc.so.2 not found (looked in {nowhere[0]}, {nowhere[1]}" in chosen.note
    with pytest.raises(allocator.AllocatorError, match="FEDSSL_CLIENTAPP_ALLOCATOR=jemalloc but libjemalloc.so.2 is not in"):
        allocator.choose({"FEDSSL_CLIENTAPP_ALLOCATOR": "jemalloc"})


def test_bad_settings_and_a_library_that_does_not_load_are_errors(tmp_path):
    with pytest.raises(allocator.AllocatorError, match="FEDSSL_CLIENTAPP_ALLOCATOR='tcmalloc': expected one of auto, jemalloc, glibc"):
        allocator.choose({"FEDSSL_CLIENTAPP_ALLOCATOR": "tcmalloc"})
    with pytest.raises(allocator.AllocatorError, match="FEDSSL_JEMALLOC_PATH='/no/such/libjemalloc.so.2': no such file"):
        allocator.choose({"FEDSSL_JEMALLOC_PATH": "/no/such/libjemalloc.so.2"})
    broken = tmp_path / "libjemalloc.so.2"
    broken.write_bytes(b"not an ELF library")
    for mode in ("auto", "jemalloc"):  # found but unusable: never a quiet switch to glibc
        with pytest.raises(allocator.AllocatorError, match=f"{broken} does not load as the ClientApp's allocator"):
            allocator.choose({"FEDSSL_CLIENTAPP_ALLOCATOR": mode, "FEDSSL_JEMALLOC_PATH": str(broken)})
