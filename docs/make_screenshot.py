"""Makes docs/django-admin-results.png: the Django admin's results list, in headless Chromium.

usage: python docs/make_screenshot.py   (needs Debian's ``chromium`` and the dev extra)
Starts an embedded PostgreSQL, runs a real ``celery worker`` over a few shop-like tasks (some
fail), serves the admin with Django's dev server on 127.0.0.1 (the screenshot user is logged in
by a middleware defined here, for this local, temporary server only), takes the screenshot, and
stops and deletes everything. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "django-admin-results.png"
sys.path.insert(0, str(ROOT / "tests"))

TASKS = textwrap.dedent("""
    import os, random, time
    import kojin_pg
    from celery import Celery
    url = os.environ["SHOT_URL"]
    app = Celery("shop", broker="kojin+" + url, backend="kojin+" + url)
    app.conf.update(result_extended=True, worker_hijack_root_logger=False)

    @app.task(name="shop.send_invoice")
    def send_invoice(order_id, email):
        time.sleep(random.random() / 10)
        return {"order": order_id, "sent_to": email}

    @app.task(name="shop.charge_card")
    def charge_card(order_id, amount_cents, currency="EUR"):
        if order_id % 5 == 0:
            raise ValueError(f"card declined for order {order_id}")
        return {"order": order_id, "charged": amount_cents, "currency": currency}

    @app.task(name="shop.resize_image")
    def resize_image(path, width=640):
        return {"path": path.replace(".jpg", f"_{width}.jpg"), "width": width}

    @app.task(name="shop.import_feed", acks_late=True)
    def import_feed(url, supplier):
        from celery.exceptions import Reject
        raise Reject(f"feed {url} is not valid XML", requeue=False)  # -> dead letters

    @app.task(name="reports.daily_sales")
    def daily_sales(day):
        return {"day": day, "orders": 412, "revenue_cents": 1893450}
""")


class AutoLogin:
    """Screenshot-only middleware: every request is the admin user (local, temporary server)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.contrib.auth import get_user_model

        request.user = get_user_model().objects.get(username="admin")
        return self.get_response(request)


def serve(default_url: str, kojin_url: str, port: int) -> None:
    """The child process: Django's dev server over the admin, bound to 127.0.0.1."""
    import django_site
    from django.conf import settings
    from django.core.management import call_command

    django_site.configure(default_url, kojin_url, "kojin", debug=True)
    settings.MIDDLEWARE.append("make_screenshot.AutoLogin")
    call_command("runserver", f"127.0.0.1:{port}", use_reloader=False, skip_checks=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_letters(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM kojin.dead_letters").fetchone()[0]


def make_rows(url: str, workdir: Path) -> None:
    """Real tasks through a real worker, so the rows are what a user would see."""
    (workdir / "shop.py").write_text(TASKS)
    env = dict(os.environ, SHOT_URL=url, PYTHONPATH=str(workdir))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "shop", "worker", "-P", "threads", "-c", "4",
         "-n", "shop-worker-1@%h", "-l", "warning", "--without-gossip", "--without-mingle"],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        sys.path.insert(0, str(workdir))
        os.environ["SHOT_URL"] = url
        from shop import app, charge_card, daily_sales, import_feed, resize_image, send_invoice

        sent = []
        for order in range(1040, 1058):
            sent.append(charge_card.delay(order, 1000 + order * 7))
            if order % 3 == 0:
                sent.append(send_invoice.delay(order, f"customer{order}@example.com"))
            if order % 4 == 0:
                sent.append(resize_image.delay(f"/media/products/{order}.jpg", width=320))
        sent.append(daily_sales.delay("2026-11-24"))
        for result in sent:
            result.get(timeout=60, propagate=False)
        import_feed.delay("https://supplier.example/feed.xml", supplier="acme")
        deadline = time.monotonic() + 30
        while not dead_letters(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        app.backend.result_consumer.stop()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)


def main() -> int:
    import psycopg
    from psycopg import sql

    from kojin_pg.db import schema as kschema
    from kojin_pg.dev.embedded import temporary_server

    server = temporary_server()
    web = None
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            for name in ("shot_django", "shot_kojin"):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        base = server.url.rsplit("/", 1)[0]
        default_url, kojin_url = base + "/shot_django", base + "/shot_kojin"
        with psycopg.connect(kojin_url, autocommit=True) as conn:
            kschema.migrate(conn, "kojin")
        with tempfile.TemporaryDirectory() as tmp:
            make_rows(kojin_url, Path(tmp))
        subprocess.run([sys.executable, __file__, "prepare", default_url, kojin_url],
                       check=True, timeout=120)
        port = free_port()
        web = subprocess.Popen([sys.executable, __file__, "serve", default_url, kojin_url,
                                str(port)], start_new_session=True)
        page = f"http://127.0.0.1:{port}/admin/kojin_pg/taskresult/"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(page, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        shots = {OUT: page}
        extra = os.environ.get("SHOT_EXTRA_DIR")  # other pages too, to look at, not committed
        if extra:
            admin = f"http://127.0.0.1:{port}/admin/kojin_pg/"
            with psycopg.connect(kojin_url) as conn:
                dead_id = conn.execute("SELECT min(id) FROM kojin.dead_letters").fetchone()[0]
            shots.update({Path(extra) / f"{name}.png": admin + path for name, path in (
                ("queues", "queue/"), ("dead_letters", "deadletter/"),
                ("dead_letter", f"deadletter/{dead_id}/change/"),
                ("failures", "taskresult/?status=FAILURE"))})
        for out, url in shots.items():
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", "--window-size=1600,1000",
                            f"--screenshot={out}", url], check=True, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"wrote {out}")
    finally:
        if web is not None:
            os.killpg(web.pid, signal.SIGTERM)
            web.wait(30)
        server.destroy()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "prepare":
        import django_site

        django_site.configure(sys.argv[2], sys.argv[3], "kojin")
        django_site.prepare_default_database()
    else:
        sys.exit(main())
