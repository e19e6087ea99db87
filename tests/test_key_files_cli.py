"""`run.py keys add FILE` with a shell or .env file: each line read as the key it holds, stored without
quotes or the variable's name, and a bad line reported by its number, never by its content."""

from __future__ import annotations

from storage import db, secrets, upstream_keys
from tests.conftest import Keyrotor

FIRST = "sk-proj-" + "k1" * 20 + "AAAA"
SECOND = "sk-" + "k2" * 20 + "BBBB"
THIRD = "sk-" + "k3" * 20 + "CCCC"
HALF = "sk-" + "k4" * 20 + "DDDD"


def test_keys_add_reads_a_dotenv_file(keyrotor: Keyrotor):
    env_file = keyrotor.tmp / "keys.env"
    env_file.write_text(
        "# exported from the old proxy\n"
        f"OPENAI_API_KEY={FIRST}\n"
        f'export OPENAI_API_KEY="{SECOND}"\n'
        "\n"
        f"'{THIRD}'  # the third\n"
        f'BROKEN="{HALF}\n'
    )
    result = keyrotor.cli("keys", "add", str(env_file))
    assert result.stdout.strip() == "added 3, skipped 0 duplicate(s), rejected 1 malformed (line 6)"
    for secret in (FIRST, SECOND, THIRD, HALF):
        assert secret not in result.stdout + result.stderr
    conn = db.connect(keyrotor.db_path)
    try:
        stored = [k.value for k in upstream_keys.load_pool(conn, secrets.key_cipher(keyrotor.db_path))]
        listed = keyrotor.cli("keys", "list").stdout
    finally:
        conn.close()
    assert sorted(stored) == sorted([FIRST, SECOND, THIRD])  # no quotes, no OPENAI_API_KEY=
    assert "OPENAI_API_KEY" not in listed and all(f"…{k[-4:]}" in listed for k in (FIRST, SECOND, THIRD))
