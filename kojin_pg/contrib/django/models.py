"""Read-only, unmanaged models over kojin_pg's tables (no Django migrations: the tables belong
to ``kojin-pg migrate``). The schema comes from ``KOJIN_PG_SCHEMA``."""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models.fields.json import KT

from .conf import db_table


class TaskResult(models.Model):
    """One row of ``results``: a task's state and outcome, as the result backend stored it."""

    task_id = models.TextField(primary_key=True, verbose_name="task id")
    status = models.TextField()
    result = models.JSONField(null=True, help_text="the result, when stored by the json serializer")
    result_bytes = models.BinaryField(null=True, help_text="the encoded meta, other serializers")
    traceback = models.TextField(null=True)
    children = models.JSONField(null=True)
    group_id = models.TextField(null=True, verbose_name="group id")
    parent_id = models.TextField(null=True, verbose_name="parent id")
    name = models.TextField(null=True, verbose_name="task name")
    args = models.JSONField(null=True)
    kwargs = models.JSONField(null=True)
    worker = models.TextField(null=True)
    retries = models.IntegerField(null=True)
    queue = models.TextField(null=True)
    date_done = models.DateTimeField(null=True, verbose_name="date done")
    expires_at = models.DateTimeField(null=True, verbose_name="expires at")

    class Meta:
        managed = False
        db_table = db_table("results")
        verbose_name = "task result"
        ordering = ("-date_done",)

    def __str__(self) -> str:
        return self.task_id


class GroupResult(models.Model):
    """One row of ``groups``: a saved GroupResult (its member ids)."""

    group_id = models.TextField(primary_key=True, verbose_name="group id")
    result = models.JSONField(null=True)
    result_bytes = models.BinaryField(null=True)
    date_done = models.DateTimeField(verbose_name="date done")
    expires_at = models.DateTimeField(null=True, verbose_name="expires at")

    class Meta:
        managed = False
        db_table = db_table("groups")
        verbose_name = "group result"
        ordering = ("-date_done",)

    def __str__(self) -> str:
        return self.group_id


class Chord(models.Model):
    """One row of ``chords``: the counter deciding when, and by whom, a chord's body is sent."""

    group_id = models.TextField(primary_key=True, verbose_name="group id")
    chord_size = models.IntegerField(null=True, verbose_name="size")
    extra = models.IntegerField()
    header_ids = ArrayField(models.TextField(), null=True)
    completed = models.IntegerField()
    claim_token = models.TextField(null=True)
    claim_until = models.DateTimeField(null=True)
    fired = models.BooleanField()
    created_at = models.DateTimeField(verbose_name="created at")
    expires_at = models.DateTimeField(null=True, verbose_name="expires at")

    class Meta:
        managed = False
        db_table = db_table("chords")
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return self.group_id


class Queue(models.Model):
    """A queue, as the admin's Queues page lists it.

    Queues have no table of their own (a queue is the ``queue`` column of ``messages``): the
    page's counts come from the broker's ``queue_stats`` query, the one ``kojin-pg queues``
    prints, and this model is never read through the ORM. It gives the page its place, URL and
    permission in the admin.
    """

    name = models.TextField(primary_key=True, db_column="queue")

    class Meta:
        managed = False
        db_table = db_table("messages")
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class MessageQuerySet(models.QuerySet):
    """Messages, with the task name read from the kombu headers."""

    def with_task_name(self) -> MessageQuerySet:
        return self.annotate(task_name=KT("payload__headers__task"))


class ScheduledManager(models.Manager):
    """The one definition of a scheduled message in this app: a row of ``messages`` the broker
    holds until its ``due_at`` (a Celery ETA/countdown task)."""

    def get_queryset(self) -> MessageQuerySet:
        return MessageQuerySet(self.model, using=self._db).filter(due_at__isnull=False)


class Message(models.Model):
    """One row of ``messages``: a kombu message waiting, leased or delayed in its queue."""

    id = models.BigIntegerField(primary_key=True)
    queue = models.TextField()
    priority = models.SmallIntegerField()
    payload = models.JSONField()
    visible_at = models.DateTimeField(verbose_name="visible at")
    delivery_count = models.IntegerField(verbose_name="deliveries")
    leased_by = models.TextField(null=True, verbose_name="leased by")
    enqueued_at = models.DateTimeField(verbose_name="enqueued at")
    due_at = models.DateTimeField(null=True, verbose_name="due at")
    task_id = models.TextField(null=True, verbose_name="task id")

    objects = MessageQuerySet.as_manager()

    class Meta:
        managed = False
        db_table = db_table("messages")
        ordering = ("id",)

    def __str__(self) -> str:
        return f"{self.queue} #{self.id}"


class ScheduledMessage(Message):
    """Messages that wait for their time (see :class:`ScheduledManager`)."""

    objects = ScheduledManager()

    class Meta:
        proxy = True
        verbose_name = "scheduled message"
        ordering = ("due_at", "id")


class DeadLetter(models.Model):
    """One row of ``dead_letters``: a message taken out of its queue, and why."""

    id = models.BigIntegerField(primary_key=True)
    queue = models.TextField()
    priority = models.SmallIntegerField()
    payload = models.JSONField()
    delivery_count = models.IntegerField(verbose_name="deliveries")
    reason = models.TextField()
    error = models.TextField(null=True)
    enqueued_at = models.DateTimeField(verbose_name="enqueued at")
    dead_at = models.DateTimeField(verbose_name="dead at")

    objects = MessageQuerySet.as_manager()

    class Meta:
        managed = False
        db_table = db_table("dead_letters")
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"{self.queue} #{self.id}"
