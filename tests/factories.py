"""factory_boy factories for the tables tests need."""
from __future__ import annotations

import factory
from django.contrib.auth import get_user_model

from labeling.models import Pair, Project, Prompt, Response, content_hash


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", "correct-horse-battery")

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):
        if create:
            obj.save()


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Project

    name = factory.Sequence(lambda n: f"Project {n}")
    slug = factory.Sequence(lambda n: f"project-{n}")


class PromptFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Prompt

    project = factory.SubFactory(ProjectFactory)
    content = factory.Sequence(lambda n: f"Prompt number {n}?")
    content_hash = factory.LazyAttribute(lambda p: content_hash(p.content))


class ResponseFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Response

    project = factory.SubFactory(ProjectFactory)
    text = factory.Sequence(lambda n: f"Response number {n}.")
    content_hash = factory.LazyAttribute(lambda r: content_hash(r.text))


class PairFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Pair

    project = factory.SubFactory(ProjectFactory)
    prompt = factory.SubFactory(PromptFactory, project=factory.SelfAttribute("..project"))
    response_a = factory.SubFactory(ResponseFactory, project=factory.SelfAttribute("..project"))
    response_b = factory.SubFactory(ResponseFactory, project=factory.SelfAttribute("..project"))
