"""The Django admin pages of kojin_pg.contrib.django, through Django's real test client.

Django's own tables (users, sessions) live in one database made for the session (the
``django_site`` fixture of conftest.py); kojin_pg's tables, in the non-default schema ``jobs``,
live in each test's fresh database, reached through the ``kojin`` alias and the router. Rows
are written by the real result backend and broker.
"""

from __future__ import annotations

import re
import uuid

import django_site as site
import psycopg
import pytest
from celery import Celery, states
from celery.app.task import Context
from kombu import Consumer, Queue

import kojin_pg  # noqa: F401  (registers the kojin+ broker URL scheme)

SCHEMA = site.SCHEMA
ADMIN = "/admin/kojin_pg/"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(django_site):
    from django.test import Client

    c = Client()
    assert c.login(username=site.ADMIN_USER, password=site.ADMIN_PASSWORD)
    return c


def sql(url: str, query: str, params=None) -> list[tuple]:
    with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def store(app: Celery, name: str, result=None, state=states.SUCCESS, **call) -> str:
    """Store a result the way a worker does (result_extended), return its task id."""
    task_id = str(uuid.uuid4())
    request = Context(id=task_id, task=name, args=call.get("args", []),
                      kwargs=call.get("kwargs", {}), hostname="w1@host", retries=0,
                      delivery_info={"routing_key": "celery"})
    if state == states.FAILURE:
        app.backend.mark_as_failure(task_id, ValueError(result), request=request,
                                    traceback=f"Traceback (most recent call last):\n"
                                              f"ValueError: {result}")
    else:
        app.backend.store_result(task_id, result, state, request=request)
    return task_id


def dead_letter(app: Celery, name: str, args, kwargs, queue: str = "celery") -> None:
    """Send a task through the broker, then reject it without requeue: a real dead letter."""
    app.send_task(name, args=args, kwargs=kwargs, queue=queue)
    got = []
    with app.connection_for_read() as conn:
        with Consumer(conn.channel(), [Queue(queue)], accept=["json"],
                      callbacks=[lambda body, message: got.append(message)]):
            while not got:
                conn.drain_events(timeout=10)
        got[0].reject(requeue=False)


def dead_ids(url: str) -> list[int]:
    return [i for (i,) in sql(url, f"SELECT id FROM {SCHEMA}.dead_letters ORDER BY id")]


def test_results_list_filters_search_and_detail(client, celery_app, kojin_url):
    add = store(celery_app, "proj.add", 5, args=[2, 3])
    mul = store(celery_app, "proj.mul", {"product": 6}, args=[2, 3], kwargs={"exact": True})
    fail = store(celery_app, "proj.div", "division by zero", state=states.FAILURE, args=[1, 0])
    old = store(celery_app, "proj.add", 9, args=[4, 5])
    sql(kojin_url, f"UPDATE {SCHEMA}.results SET date_done = now() - interval '30 days' "
                   "WHERE task_id = %s", (old,))

    def listed(query: str = "") -> set[str]:
        page = client.get(ADMIN + "taskresult/" + query)
        assert page.status_code == 200
        return {t for t in (add, mul, fail, old) if t in page.content.decode()}

    assert listed() == {add, mul, fail, old}
    assert listed("?status=FAILURE") == {fail}
    assert listed("?name=proj.add") == {add, old}
    assert listed("?name=proj.add&status=SUCCESS") == {add, old}
    assert listed(f"?q={mul}") == {mul}
    assert listed("?q=no-such-task") == set()
    page = client.get(ADMIN + "taskresult/")
    cl = page.context["cl"]
    past_week = next(c["query_string"] for spec in cl.filter_specs for c in spec.choices(cl)
                     if c["display"] == "Past 7 days")
    assert listed(past_week) == {add, mul, fail}

    html = page.content.decode()
    assert "proj.div" in html and "w1@host" in html and "FAILURE" in html
    # the filters' choices are the table's distinct values
    choices = {c["display"] for spec in page.context["cl"].filter_specs
               for c in spec.choices(page.context["cl"])}
    assert {"proj.add", "proj.mul", "proj.div", "SUCCESS", "FAILURE"} <= choices

    detail = client.get(f"{ADMIN}taskresult/{fail}/change/")
    assert detail.status_code == 200
    html = detail.content.decode()
    assert "ValueError: division by zero" in html and "Traceback (most recent call last)" in html
    detail = client.get(f"{ADMIN}taskresult/{mul}/change/").content.decode()
    assert "&quot;product&quot;: 6" in detail and "&quot;exact&quot;: true" in detail


def test_queues_page_counts_ready_leased_delayed_dead(client, celery_app, kojin_url):
    for i in range(3):
        celery_app.send_task("proj.add", args=[i, i], queue="celery")
    celery_app.send_task("proj.mul", args=[1, 2], queue="reports")
    dead_letter(celery_app, "proj.div", [1, 0], {}, queue="failing")
    # one leased, one delayed (what the broker's scheduled state is today)
    sql(kojin_url, f"UPDATE {SCHEMA}.messages SET visible_at = now() + interval '1 hour', "
                   "leased_by = 'w1' WHERE id = (SELECT min(id) FROM jobs.messages)")
    sql(kojin_url, f"UPDATE {SCHEMA}.messages SET visible_at = now() + interval '1 hour' "
                   "WHERE id = (SELECT max(id) FROM jobs.messages WHERE queue = 'celery')")

    page = client.get(ADMIN + "queue/")
    assert page.status_code == 200
    html = page.content.decode()

    def row(name: str) -> tuple[int, ...]:
        cells = re.search(rf'<th class="queue-name">{name}</th>(.*?)</tr>', html, re.S).group(1)
        ready, leased, delayed, dead = (re.search(rf'<td class="{c}">(?:<a [^>]*>)?(\d+)', cells)
                                        for c in ("ready", "leased", "delayed", "dead"))
        return tuple(int(m.group(1)) for m in (ready, leased, delayed, dead))

    assert row("celery") == (1, 1, 1, 0)
    assert row("reports") == (1, 0, 0, 0)
    assert row("failing") == (0, 0, 0, 1)
    # the app index links to the page
    assert ADMIN + "queue/" in client.get(ADMIN).content.decode()


def test_scheduled_messages_lists_only_delayed(client, celery_app, kojin_url):
    celery_app.send_task("proj.later", args=[7], kwargs={"when": "tomorrow"}, queue="celery",
                         countdown=86400)  # the broker holds it until then
    celery_app.send_task("proj.now", args=[1], queue="celery")
    page = client.get(ADMIN + "scheduledmessage/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "proj.later" in html and "proj.now" not in html
    (mid,) = sql(kojin_url, f"SELECT id FROM {SCHEMA}.messages "
                            "WHERE payload->'headers'->>'task' = 'proj.later'")[0]
    detail = client.get(f"{ADMIN}scheduledmessage/{mid}/change/")
    assert detail.status_code == 200
    assert "&quot;when&quot;: &quot;tomorrow&quot;" in detail.content.decode()
    assert client.get(ADMIN + "scheduledmessage/?queue=other").content.decode().count(
        "proj.later") == 0


def test_dead_letters_list_search_and_decoded_detail(client, celery_app, kojin_url):
    dead_letter(celery_app, "proj.div", [1, 0], {"mode": "strict"})
    dead_letter(celery_app, "proj.report", ["q3"], {}, queue="reports")
    div, report = dead_ids(kojin_url)

    page = client.get(ADMIN + "deadletter/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "proj.div" in html and "proj.report" in html and "rejected" in html
    html = client.get(ADMIN + "deadletter/?queue=reports").content.decode()
    assert "proj.report" in html and "proj.div" not in html
    html = client.get(ADMIN + "deadletter/?q=proj.div").content.decode()
    assert "proj.div" in html and "proj.report" not in html
    task_id = sql(kojin_url, f"SELECT payload->'headers'->>'id' FROM {SCHEMA}.dead_letters "
                             "WHERE id = %s", (report,))[0][0]
    html = client.get(ADMIN + f"deadletter/?q={task_id}").content.decode()
    assert "proj.report" in html and "proj.div" not in html

    detail = client.get(f"{ADMIN}deadletter/{div}/change/")
    assert detail.status_code == 200
    html = detail.content.decode()
    # decoded from the base64 kombu body, not shown as base64
    assert "proj.div" in html and "&quot;mode&quot;: &quot;strict&quot;" in html
    assert re.search(r"\[\s*1,\s*0\s*\]", html)


def test_requeue_action_moves_dead_letter_back_to_its_queue(client, celery_app, kojin_url):
    dead_letter(celery_app, "proj.div", [1, 0], {})
    dead_letter(celery_app, "proj.keep", [2], {})
    div, keep = dead_ids(kojin_url)
    payload = sql(kojin_url, f"SELECT payload FROM {SCHEMA}.dead_letters WHERE id = %s", (div,))

    response = client.post(ADMIN + "deadletter/", {"action": "requeue",
                                                   "_selected_action": [div]}, follow=True)
    assert response.status_code == 200
    assert "Requeued 1 dead letters." in response.content.decode()
    assert dead_ids(kojin_url) == [keep]
    back = sql(kojin_url, f"SELECT queue, payload, delivery_count FROM {SCHEMA}.messages")
    assert back == [("celery", payload[0][0], 0)]
    # and a consumer gets it again
    with celery_app.connection_for_read() as conn:
        got = []
        with Consumer(conn.channel(), [Queue("celery")], accept=["json"],
                      callbacks=[lambda body, message: (got.append(body), message.ack())]):
            conn.drain_events(timeout=10)
    assert got == [[[1, 0], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                 "chord": None}]]


def test_purge_action_confirms_then_deletes(client, celery_app, kojin_url):
    dead_letter(celery_app, "proj.div", [1, 0], {})
    dead_letter(celery_app, "proj.keep", [2], {})
    div, keep = dead_ids(kojin_url)

    confirm = client.post(ADMIN + "deadletter/", {"action": "purge", "_selected_action": [div]})
    assert confirm.status_code == 200 and "Yes, purge them" in confirm.content.decode()
    assert dead_ids(kojin_url) == [div, keep]  # nothing deleted before the confirmation

    done = client.post(ADMIN + "deadletter/", {"action": "purge", "_selected_action": [div],
                                               "confirm": "yes"}, follow=True)
    assert done.status_code == 200 and "Purged 1 dead letters." in done.content.decode()
    assert dead_ids(kojin_url) == [keep]
    assert sql(kojin_url, f"SELECT count(*) FROM {SCHEMA}.messages") == [(0,)]


def test_read_only_pages_need_login_and_refuse_writes(client, celery_app, kojin_url):
    from django.test import Client

    task_id = store(celery_app, "proj.add", 5)
    assert Client().get(ADMIN + "taskresult/").status_code == 302  # to the login page
    assert client.get(ADMIN + "taskresult/add/").status_code == 403
    assert client.get(f"{ADMIN}taskresult/{task_id}/delete/").status_code == 403
    for model in ("groupresult", "chord"):
        assert client.get(ADMIN + model + "/").status_code == 200


def test_admin_queries_use_the_indexes(celery_app, kojin_url):
    """On a results table large enough for the planner to care, the admin's list queries walk
    the 0003 indexes instead of sorting the table."""
    from django.db import connections

    from kojin_pg.contrib.django.models import TaskResult

    sql(kojin_url, f"""
        INSERT INTO {SCHEMA}.results (task_id, status, name, date_done)
        SELECT 't' || i, CASE WHEN i % 1000 = 0 THEN 'FAILURE' ELSE 'SUCCESS' END,
               CASE WHEN i % 1000 = 1 THEN 'proj.rare' ELSE 'proj.task' || (i % 50) END,
               now() - make_interval(secs => i)
        FROM generate_series(1, 50000) i""")
    sql(kojin_url, f"ANALYZE {SCHEMA}.results")
    connections["kojin"].close()
    page = TaskResult.objects.order_by("-date_done", "-task_id")
    plans = {
        "results_date_done_idx": page[:50],
        "results_status_date_done_idx": page.filter(status="FAILURE")[:50],
        "results_name_date_done_idx": page.filter(name="proj.rare")[:50],
    }
    for index, queryset in plans.items():
        plan = queryset.explain()
        assert index in plan, plan
    from kojin_pg.contrib.django import operations

    assert len(operations.distinct_values("results", "name")) == 51

    # the unfiltered count of a big table is the planner's estimate; a filtered one is exact
    from kojin_pg.contrib.django.paginator import EstimatedCountPaginator

    class Paginator(EstimatedCountPaginator):
        exact_count_limit = 10_000

    estimate = Paginator(TaskResult.objects.all(), 50).count
    assert 45_000 <= estimate <= 55_000
    assert Paginator(TaskResult.objects.filter(status="FAILURE"), 50).count == 50
    assert EstimatedCountPaginator(TaskResult.objects.all(), 50).count == 50_000


def test_django_makes_no_migrations_for_the_app(kojin_url):
    """The models are unmanaged and the app has no migrations package: ``makemigrations``
    leaves it alone, and Django's ``migrate`` never touches kojin_pg's tables."""
    from io import StringIO

    from django.core.management import call_command

    call_command("check")  # SystemCheckError on any error of the models or admin classes
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)  # SystemExit(1) if any
    assert "No changes detected" in out.getvalue()
    from kojin_pg.contrib.django.models import TaskResult

    assert TaskResult._meta.db_table == f'"{SCHEMA}"."results"'


def test_database_from_url_drops_kojin_options_keeps_libpq_ones():
    from kojin_pg.contrib.django.conf import database_from_url

    entry = database_from_url("kojin+postgresql://app:s3cret@db1:5433/shop"
                              "?schema=jobs&pool_max_size=4&sslmode=require")
    assert entry == {"ENGINE": "django.db.backends.postgresql", "NAME": "shop", "USER": "app",
                     "PASSWORD": "s3cret", "HOST": "db1", "PORT": "5433",
                     "OPTIONS": {"sslmode": "require"}}


def test_view_only_staff_sees_dead_letters_but_cannot_requeue_or_purge(celery_app, kojin_url):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.test import Client

    user, created = get_user_model().objects.get_or_create(username="viewer", is_staff=True)
    if created:
        user.set_password("viewer-password")
        user.save()
        user.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    dead_letter(celery_app, "proj.div", [1, 0], {})
    (div,) = dead_ids(kojin_url)
    viewer = Client()
    assert viewer.login(username="viewer", password="viewer-password")

    page = viewer.get(ADMIN + "deadletter/")
    assert page.status_code == 200 and "proj.div" in page.content.decode()
    assert 'name="action"' not in page.content.decode()  # no actions offered
    for action in ("requeue", "purge"):
        viewer.post(ADMIN + "deadletter/", {"action": action, "_selected_action": [div],
                                            "confirm": "yes"})
    assert dead_ids(kojin_url) == [div]
    assert sql(kojin_url, f"SELECT count(*) FROM {SCHEMA}.messages") == [(0,)]
