"""The embedded server's data directory is created privately and never through a symlink."""

from __future__ import annotations

import os
import stat

import pytest

from kojin_pg.dev.embedded import EmbeddedServer, UnsafeDataDir, private_dir

NOBODY = 65534


def test_a_fresh_directory_is_private(tmp_path):
    made = private_dir(tmp_path / "a" / "b" / "data")
    st = os.lstat(made)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    assert private_dir(made) == made  # a second run accepts its own directory


def test_a_symlink_planted_at_the_data_directory_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    before = os.stat(victim)
    (tmp_path / "data").symlink_to(victim)
    server = EmbeddedServer(tmp_path / "data")
    with pytest.raises(UnsafeDataDir, match="symbolic link"):
        server.start()
    after = os.stat(victim)
    # nothing was chowned, chmodded or created through the link
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                           before.st_mode)
    assert list(victim.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root")
def test_paths_another_user_controls_are_refused(tmp_path):
    os.chmod(tmp_path, 0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    os.lchown(link, NOBODY, NOBODY)  # a parent link another user planted
    with pytest.raises(UnsafeDataDir, match="symbolic link owned by uid 65534"):
        private_dir(link / "data")
    assert not (elsewhere / "data").exists()

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)  # a data directory another user pre-created
    with pytest.raises(UnsafeDataDir, match="belongs to uid 65534"):
        private_dir(theirs)
    assert os.stat(theirs).st_uid == NOBODY

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # world-writable without the sticky bit: anyone could swap
    with pytest.raises(UnsafeDataDir, match="other users may write"):
        private_dir(open_dir / "data")
    os.chmod(open_dir, 0o1777)  # like /tmp: sticky, so our entry cannot be replaced
    assert stat.S_IMODE(os.stat(private_dir(open_dir / "data")).st_mode) == 0o700


def test_a_file_or_the_root_is_refused(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(UnsafeDataDir, match="not a directory"):
        private_dir(tmp_path / "data")
    with pytest.raises(UnsafeDataDir, match="root directory"):
        private_dir("/")


def test_a_temporary_server_leaves_nothing_behind():
    """destroy() removes the temporary directory that temporary_server() made around the data
    directory, not only the data directory (each test session and bench run made one)."""
    from kojin_pg.dev.embedded import temporary_server

    server = temporary_server()
    root = server.data_dir.parent
    assert root.name.startswith("kojin_pg_")
    server.destroy()
    assert not root.exists()
