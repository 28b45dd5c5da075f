"""Admin pages: results, groups, chords, queues, scheduled messages and dead letters.

Everything is read-only; the only writes are the dead-letter actions (requeue, purge), which run
kojin_pg's own ``dlq_requeue`` and ``dlq_purge`` queries, as ``kojin-pg dlq`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from kojin_pg.taskmessage import TaskMessage

from . import display, operations
from .filters import DeadLetterQueueFilter, MessageQueueFilter, StatusFilter, TaskNameFilter
from .models import Chord, DeadLetter, GroupResult, Queue, ScheduledMessage, TaskResult
from .paginator import EstimatedCountPaginator


class ReadOnlyAdmin(admin.ModelAdmin):
    """Shows rows; never adds, edits or deletes them through the ORM."""

    show_full_result_count = False  # a second count(*) over the whole table on every page
    list_per_page = 50
    if hasattr(admin, "ShowFacets"):  # Django 5.0+: a count per filter choice, each a scan
        show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TaskResult)
class TaskResultAdmin(ReadOnlyAdmin):
    list_display = ("task_id", "name", "colored_status", "done", "worker")
    list_filter = (StatusFilter, TaskNameFilter, "date_done")
    search_fields = ("task_id__exact",)
    search_help_text = "Search by task id (exact)."
    paginator = EstimatedCountPaginator
    fieldsets = (
        (None, {"fields": ("task_id", "name", "colored_status", "date_done", "worker", "queue",
                           "retries", "expires_at")}),
        ("Outcome", {"fields": ("result_value", "traceback_text")}),
        ("Call", {"fields": ("args_value", "kwargs_value")}),
        ("Relations", {"fields": ("group_id", "parent_id", "children_value")}),
    )
    readonly_fields = ("colored_status", "result_value", "traceback_text", "args_value",
                       "kwargs_value", "children_value")

    @admin.display(description="date done", ordering="date_done")
    def done(self, obj: TaskResult) -> str:
        return display.timestamp(obj.date_done)

    @admin.display(description="status", ordering="status")
    def colored_status(self, obj: TaskResult) -> Any:
        return display.status(obj.status)

    @admin.display(description="result")
    def result_value(self, obj: TaskResult) -> Any:
        if obj.result is None and obj.result_bytes is not None:
            return f"{len(obj.result_bytes)} bytes encoded by a non-JSON result serializer"
        return display.pretty_json(obj.result)

    @admin.display(description="traceback")
    def traceback_text(self, obj: TaskResult) -> Any:
        return display.pre(obj.traceback)

    @admin.display(description="args")
    def args_value(self, obj: TaskResult) -> Any:
        return display.pretty_json(obj.args)

    @admin.display(description="kwargs")
    def kwargs_value(self, obj: TaskResult) -> Any:
        return display.pretty_json(obj.kwargs)

    @admin.display(description="children")
    def children_value(self, obj: TaskResult) -> Any:
        return display.pretty_json(obj.children)


@admin.register(GroupResult)
class GroupResultAdmin(ReadOnlyAdmin):
    list_display = ("group_id", "date_done", "expires_at")
    search_fields = ("group_id__exact",)
    search_help_text = "Search by group id (exact)."
    fields = ("group_id", "date_done", "expires_at", "result_value")
    readonly_fields = ("result_value",)

    @admin.display(description="result")
    def result_value(self, obj: GroupResult) -> Any:
        return display.pretty_json(obj.result)


@admin.register(Chord)
class ChordAdmin(ReadOnlyAdmin):
    list_display = ("group_id", "chord_size", "completed", "fired", "created_at")
    list_filter = ("fired",)
    search_fields = ("group_id__exact",)
    search_help_text = "Search by group id (exact)."


@admin.register(Queue)
class QueueAdmin(admin.ModelAdmin):
    """One page: every queue with its ready, leased, delayed and dead messages."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        return [path("", self.admin_site.admin_view(self.changelist_view),
                     name="{}_{}_changelist".format(*info))]

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        context = {**self.admin_site.each_context(request), "opts": self.opts,
                   "title": "Queues", "queues": operations.queue_counts(),
                   **(extra_context or {})}
        return TemplateResponse(request, "admin/kojin_pg/queues.html", context)


class MessageAdmin(ReadOnlyAdmin):
    """Shared by scheduled messages and dead letters: the task decoded from the payload."""

    detail_task_fields = ("task_name_decoded", "task_id_decoded", "args_value", "kwargs_value",
                          "decode_problem", "headers_value")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).with_task_name()

    @admin.display(description="enqueued at", ordering="enqueued_at")
    def enqueued(self, obj: Any) -> str:
        return display.timestamp(obj.enqueued_at)

    @admin.display(description="due at", ordering="due_at")
    def due(self, obj: Any) -> str:
        return display.timestamp(obj.due_at)

    @admin.display(description="dead at", ordering="dead_at")
    def died(self, obj: Any) -> str:
        return display.timestamp(obj.dead_at)

    @admin.display(description="task", ordering="task_name")
    def task_name(self, obj: Any) -> str:
        return obj.task_name or "-"

    @staticmethod
    def _task(obj: Any) -> TaskMessage:
        """The decoded task of a row, decoded once per row and page."""
        task = obj.__dict__.get("_kojin_task")
        if task is None:
            task = obj.__dict__["_kojin_task"] = display.task_of(obj.payload)
        return task

    @admin.display(description="task name")
    def task_name_decoded(self, obj: Any) -> str:
        return self._task(obj).name or "-"

    @admin.display(description="task id")
    def task_id_decoded(self, obj: Any) -> str:
        return self._task(obj).task_id or "-"

    @admin.display(description="args")
    def args_value(self, obj: Any) -> Any:
        return display.arguments(self._task(obj), "args")

    @admin.display(description="kwargs")
    def kwargs_value(self, obj: Any) -> Any:
        return display.arguments(self._task(obj), "kwargs")

    @admin.display(description="not decoded")
    def decode_problem(self, obj: Any) -> str:
        return self._task(obj).problem or "-"

    @admin.display(description="headers")
    def headers_value(self, obj: Any) -> Any:
        return display.pretty_json((obj.payload or {}).get("headers"))

    def get_search_results(self, request: HttpRequest, queryset: QuerySet,
                           search_term: str) -> tuple[QuerySet, bool]:
        """A number is a message id; anything else a task id or a task name."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if term.isdigit():
            return queryset.filter(id=int(term)), False
        return queryset.filter(Q(payload__headers__id=term) | Q(task_name=term)), False


@admin.register(ScheduledMessage)
class ScheduledMessageAdmin(MessageAdmin):
    list_display = ("id", "queue", "task_name", "due", "enqueued", "priority")
    list_filter = (MessageQueueFilter,)
    search_fields = ("queue",)  # shows the search box; get_search_results does the work
    search_help_text = "Search by message id, task id or task name."
    fields = ("id", "queue", "priority", "due_at", "task_id", "enqueued_at", "delivery_count",
              *MessageAdmin.detail_task_fields)
    readonly_fields = MessageAdmin.detail_task_fields


@admin.register(DeadLetter)
class DeadLetterAdmin(MessageAdmin):
    list_display = ("id", "queue", "task_name", "reason", "delivery_count", "died")
    list_filter = (DeadLetterQueueFilter, "reason")
    search_fields = ("queue",)  # shows the search box; get_search_results does the work
    search_help_text = "Search by message id, task id or task name."
    fields = ("id", "queue", "priority", "reason", "error", "delivery_count", "enqueued_at",
              "dead_at", *MessageAdmin.detail_task_fields)
    readonly_fields = MessageAdmin.detail_task_fields
    actions = ("requeue", "purge")

    def has_requeue_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.change_{self.opts.model_name}")

    def has_purge_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.delete_{self.opts.model_name}")

    @staticmethod
    def _ids(queryset: QuerySet) -> Sequence[int]:
        return list(queryset.values_list("id", flat=True))

    @admin.action(description="Requeue selected dead letters", permissions=("requeue",))
    def requeue(self, request: HttpRequest, queryset: QuerySet) -> None:
        moved = operations.requeue_dead_letters(self._ids(queryset))
        self.message_user(request, f"Requeued {moved} dead letters.", messages.SUCCESS)

    @admin.action(description="Purge selected dead letters", permissions=("purge",))
    def purge(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        if request.POST.get("confirm") != "yes":
            context = {**self.admin_site.each_context(request), "opts": self.opts,
                       "title": "Purge dead letters?", "dead_letters": queryset,
                       "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME}
            return TemplateResponse(request, "admin/kojin_pg/purge_confirmation.html", context)
        purged = operations.purge_dead_letters(self._ids(queryset))
        self.message_user(request, f"Purged {purged} dead letters.", messages.SUCCESS)
        return None
