"""FieldsOnce: serializer fields built once per class give the same output and validation as DRF's own."""
from __future__ import annotations

import threading

import pytest
from rest_framework import serializers

from labeling.apis import ComparisonOutput, ComparisonSubmitApi, ComparisonSubmitOutput, ProjectOutput
from labeling.models import Comparison, Project
from labeling.serializing import FieldsOnce
from tests.factories import PairFactory


class Inner(serializers.Serializer):
    code = serializers.CharField(max_length=3)


class Plain(serializers.Serializer):
    name = serializers.CharField(max_length=5)
    tags = serializers.ListField(child=serializers.ChoiceField(choices=["a", "b"]), max_length=3)
    scores = serializers.DictField(child=serializers.IntegerField(min_value=0))
    inner = Inner(required=False)
    items = Inner(many=True, required=False)
    shout = serializers.SerializerMethodField()

    def get_shout(self, obj) -> str:
        return obj["name"].upper()


class Once(FieldsOnce, Plain):
    pass


class OnceChild(Once):
    extra = serializers.IntegerField(default=7)


INPUTS = [
    {"name": "abc", "tags": ["a", "b"], "scores": {"x": 1}, "inner": {"code": "ok"}, "items": [{"code": "i"}]},
    {"name": "toolong", "tags": ["a", "c"], "scores": {"x": -1}, "inner": {"code": "four"}, "items": [{}]},
    {"name": "ab", "tags": "a", "scores": [], "items": {"code": "x"}},
    {},
]


@pytest.mark.parametrize("data", INPUTS)
def test_validation_matches_drf(data):
    plain, once = Plain(data=data), Once(data=data)
    assert plain.is_valid() == once.is_valid()
    assert plain.errors == once.errors
    assert dict(plain.validated_data if not plain.errors else {}) == dict(once.validated_data if not once.errors
                                                                          else {})


def test_each_instance_gets_its_own_bound_fields():
    first, second = Once(data=INPUTS[0]), Once(data=INPUTS[1])
    for name in ("name", "tags", "scores", "inner", "items", "shout"):
        assert first.fields[name] is not second.fields[name]
        assert first.fields[name].parent is first and second.fields[name].parent is second
        assert first.fields[name].field_name == name
    # A list's child belongs to that list, not to the class's prototype or another instance.
    assert first.fields["tags"].child is not second.fields["tags"].child
    assert first.fields["tags"].child.parent is first.fields["tags"]
    assert first.fields["shout"].method_name == "get_shout"
    assert first.is_valid() and not second.is_valid()
    assert first.validated_data["tags"] == ["a", "b"] and "tags" in second.errors


def test_a_subclass_builds_fields_of_its_own():
    assert "extra" not in Once().fields
    assert OnceChild(data={**INPUTS[0]}).fields["extra"].default == 7
    assert "extra" not in Once().fields
    assert set(ComparisonOutput().fields) | {"next"} == set(ComparisonSubmitOutput().fields)


def test_output_matches_drf():
    row = {"name": "abc", "tags": ["a"], "scores": {"x": 2}, "inner": {"code": "ok"}, "items": [{"code": "z"}]}
    assert Once(row).data == Plain(row).data == {**row, "shout": "ABC"}


def test_threads_validating_at_once_keep_their_own_errors():
    results: dict[int, tuple[bool, dict]] = {}
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(50):
            serializer = Once(data=INPUTS[i % 2])
            valid = serializer.is_valid()
            if valid != (i % 2 == 0):
                results[i] = (valid, dict(serializer.errors))
                return
        results[i] = (valid, dict(serializer.errors))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: valid for i, (valid, _) in results.items()} == {i: i % 2 == 0 for i in range(8)}
    assert all(set(errors) == {"name", "tags", "scores", "inner", "items"} for i, (_, errors) in results.items()
               if i % 2)


@pytest.mark.django_db
def test_model_serializers_match_drf(project, labeler):
    pair = PairFactory(project=project)
    comparison = Comparison.objects.create(pair=pair, project=project, labeler=labeler, choice="a", strength=2,
                                           rationale="Clearer.", flags=["unsafe"], swapped=True, time_ms=1200)

    class PlainComparison(serializers.ModelSerializer):
        labeler = serializers.CharField(source="labeler.username", allow_null=True, default=None)
        shown_choice = serializers.SerializerMethodField()

        class Meta(ComparisonOutput.Meta):
            pass

        get_shown_choice = ComparisonOutput.get_shown_choice

    class PlainProject(serializers.ModelSerializer):
        class Meta(ProjectOutput.Meta):
            pass

    assert ComparisonOutput(comparison).data == PlainComparison(comparison).data
    assert ComparisonOutput(comparison).data["shown_choice"] == "right"
    project = Project.objects.get(pk=project.pk)
    assert ProjectOutput(project).data == PlainProject(project).data
    assert ComparisonSubmitApi.InputSerializer(data={"pair": 1, "choice": "up"}).is_valid() is False
    assert ComparisonSubmitApi.InputSerializer(data={"pair": 1, "choice": "left", "flags": ["unsafe"]}).is_valid()
