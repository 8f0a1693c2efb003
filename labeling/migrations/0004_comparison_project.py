"""Comparisons carry their pair's project: filled from the pairs, then held to them by a foreign key on PostgreSQL."""
import django.db.models.deletion
from django.db import migrations, models

COMPOSITE_FK = "comparison_pair_in_project"


def composite_fk_add(apps, schema_editor):
    # Django has no composite foreign keys; PostgreSQL holds the rule that a comparison's project is its pair's.
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        f"ALTER TABLE labeling_comparison ADD CONSTRAINT {COMPOSITE_FK} FOREIGN KEY (pair_id, project_id) "
        "REFERENCES labeling_pair (id, project_id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED"
    )


def composite_fk_drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"ALTER TABLE labeling_comparison DROP CONSTRAINT IF EXISTS {COMPOSITE_FK}")


class Migration(migrations.Migration):

    dependencies = [
        ("labeling", "0003_project_rerank_sampling"),
    ]

    operations = [
        migrations.AddField(
            model_name="comparison",
            name="project",
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.CASCADE,
                                    related_name="comparisons", to="labeling.project"),
        ),
        migrations.RunSQL(
            "UPDATE labeling_comparison SET project_id = (SELECT p.project_id FROM labeling_pair p "
            "WHERE p.id = labeling_comparison.pair_id)",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name="comparison",
            name="project",
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="comparisons",
                                    to="labeling.project"),
        ),
        migrations.AddConstraint(
            model_name="pair",
            constraint=models.UniqueConstraint(fields=("id", "project"), name="pair_id_project"),
        ),
        migrations.AddIndex(
            model_name="comparison",
            index=models.Index(fields=["project", "source"], name="comparison_project_source"),
        ),
        migrations.RunPython(composite_fk_add, composite_fk_drop),
    ]
