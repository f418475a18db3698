"""Seed the example site with real-looking content: a Site, authors, a Blog, posts with
tags and revisions. Deterministic for a given --seed, so sandboxes are reproducible.
"""
import datetime
import random

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from wagtail.models import Page, Site

from blog.models import Blog, Post

WORDS = (
    "harbour keel hull rudder mast anchor tide ballast bilge bow stern deck galley "
    "compass chart beacon lantern rope sail current drift berth crane dock yard "
    "migration backup restore schema index table page tree revision slug"
).split()
TAGS = ["python", "django", "wagtail", "postgres", "ansible", "ops", "podcast", "release"]


def paragraph(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"<p>{text.capitalize()}.</p>"


class Command(BaseCommand):
    help = "Create the example site's content (idempotent: refuses if a Blog exists)."

    def add_arguments(self, parser):
        parser.add_argument("--posts", type=int, default=220)
        parser.add_argument("--paragraphs", type=int, default=4, help="paragraphs per post body")
        parser.add_argument("--hostname", default="www.drydock-example.org")
        parser.add_argument("--port", type=int, default=443)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--offset", type=int, default=0, help="add posts to an existing Blog, numbered from here")

    @transaction.atomic
    def handle(self, *args, posts, paragraphs, hostname, port, seed, offset, **options):
        rng = random.Random(seed + offset)
        blog = Blog.objects.first()
        if blog is None:
            if offset:
                raise CommandError("--offset needs an existing Blog")
            blog = self.create_site(hostname, port)
        elif not offset:
            raise CommandError("the site is seeded already (use --offset to add posts)")
        authors = list(get_user_model().objects.filter(username__startswith="author"))
        start = datetime.date(2019, 1, 1)
        for number in range(offset + 1, offset + posts + 1):
            post = Post(
                title=f"Episode {number}: {rng.choice(WORDS)} and {rng.choice(WORDS)}",
                slug=f"post-{number}",
                visible_date=start + datetime.timedelta(days=number),
                body="".join(paragraph(rng, 60) for _ in range(paragraphs)),
                author=rng.choice(authors),
            )
            blog.add_child(instance=post)
            post.tags.add(*rng.sample(TAGS, 2))
            post.save_revision(user=post.author).publish()
            if number % 3 == 0:  # some posts were edited after publishing
                post.body += paragraph(rng, 30)
                post.save_revision(user=post.author)
            if number % 100 == 0:
                self.stdout.write(f"  {number - offset}/{posts} posts")
        self.stdout.write(f"seeded {posts} posts under {blog.url_path}")

    def create_site(self, hostname: str, port: int) -> Blog:
        User = get_user_model()
        User.objects.create_superuser("admin", "admin@drydock-example.org", "admin-not-a-real-password")
        for number, name in enumerate(["Ada Lovelace", "Grace Hopper", "Edsger Dijkstra"], 1):
            first, last = name.split()
            User.objects.create_user(
                f"author{number}", f"{first.lower()}@drydock-example.org", None,
                first_name=first, last_name=last,
            )
        home = Site.objects.get(is_default_site=True).root_page
        blog = Blog(title="The Drydock Log", slug="blog", description="<p>Notes from the yard.</p>")
        home.add_child(instance=blog)
        blog.save_revision().publish()
        Site.objects.filter(is_default_site=True).update(hostname=hostname, port=port, site_name="Drydock")
        from django.contrib.sites.models import Site as DjangoSite

        DjangoSite.objects.update_or_create(id=1, defaults={"domain": hostname, "name": "Drydock"})
        return blog
