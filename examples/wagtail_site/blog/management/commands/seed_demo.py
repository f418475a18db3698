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
    help = "Create the example site's content (refuses if a Blog exists, unless --offset adds to it)."

    def add_arguments(self, parser):
        parser.add_argument("--posts", type=int, default=220)
        parser.add_argument("--paragraphs", type=int, default=4, help="paragraphs per post body")
        parser.add_argument("--hostname", default="www.drydock-example.org")
        parser.add_argument("--port", type=int, default=443)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--offset", type=int, default=0, help="add posts to an existing Blog, numbered from here")
        parser.add_argument("--bulk", type=int, default=0,
                            help="then add this many posts by SQL (pages, posts, revisions, tags): for large databases")

    @transaction.atomic
    def handle(self, *args, posts, paragraphs, hostname, port, seed, offset, bulk, **options):
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
        if bulk:
            bulk_seed(blog, bulk, paragraphs, rng, self.stdout.write)

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


BULK_BATCH = 500
# Log entries per bulk post (wagtailcore_pagelogentry: a wide table with ten indexes).
BULK_LOG_ENTRIES = 6
LOG_ACTIONS = ["wagtail.create", "wagtail.edit", "wagtail.publish", "wagtail.edit", "wagtail.publish",
               "wagtail.rename", "wagtail.view_restriction.create", "wagtail.workflow.approve"]


class BulkText:
    """Text shaped like real prose, fast enough for a gigabyte: a 4,000-word vocabulary
    drawn with Zipf frequencies (so it compresses about as well as English: pglz ~1.5x,
    zlib ~3x), and post bodies assembled from a pool of such paragraphs."""

    def __init__(self, rng: random.Random, pool: int = 3000, words: int = 4000):
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ea", "ou")]
        vocabulary = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(words)})
        rng.shuffle(vocabulary)
        weights = [1 / rank for rank in range(1, len(vocabulary) + 1)]
        self.rng = rng
        self.paragraphs = []
        for _ in range(pool):
            text = " ".join(rng.choices(vocabulary, weights, k=rng.randint(60, 140)))
            self.paragraphs.append(f"<p>{text.capitalize()}.</p>")

    def body(self, paragraphs: int) -> str:
        return "".join(self.rng.choices(self.paragraphs, k=paragraphs))


def bulk_seed(blog: Blog, count: int, paragraphs: int, rng: random.Random, say) -> None:
    """Add `count` posts in SQL, cloning the newest post's row for every column Wagtail
    needs, with a published revision (its content as JSON), two tags and a history of log
    entries each; the page tree stays valid (paths follow the Blog's last child, and the
    Blog's numchild is updated).

    About 30 times faster than creating pages through Wagtail: meant for benchmark-sized
    databases, where the content only has to be realistic in shape and size.
    """
    from django.db import connection

    template = Post.objects.filter(path__startswith=blog.path).order_by("-path").first()
    if template is None:
        raise CommandError("--bulk needs at least one post created the normal way first")
    tag_ids = list(Post.tags.through.tag_model().objects.values_list("id", flat=True))
    next_step = Page._str2int(template.path[-Page.steplen:]) + 1
    number = Post.objects.count()
    text = BulkText(rng)
    with connection.cursor() as cur:
        for start in range(0, count, BULK_BATCH):
            size = min(BULK_BATCH, count - start)
            steps = range(next_step + start, next_step + start + size)
            numbers = [number + start + i + 1 for i in range(size)]
            cur.execute(BULK_SQL, {
                "template": template.pk, "blog": blog.pk, "log_entries": BULK_LOG_ENTRIES, "actions": LOG_ACTIONS,
                "paths": [Page._get_path(blog.path, blog.depth + 1, step) for step in steps],
                "titles": [f"Episode {n}: {rng.choice(WORDS)} and {rng.choice(WORDS)}" for n in numbers],
                "slugs": [f"post-{n}" for n in numbers],
                "bodies": [text.body(paragraphs) for _ in numbers],
                "tag_a": [rng.choice(tag_ids) for _ in numbers],
                "tag_b": [rng.choice(tag_ids) for _ in numbers],
            })
            if (start // BULK_BATCH) % 20 == 0 or start + size == count:
                say(f"  bulk: {start + size}/{count} posts")
        cur.execute("UPDATE wagtailcore_page SET numchild = numchild + %s WHERE id = %s", [count, blog.pk])


BULK_SQL = """
WITH input AS (
    SELECT * FROM unnest(%(paths)s::text[], %(titles)s::text[], %(slugs)s::text[], %(bodies)s::text[],
                         %(tag_a)s::int[], %(tag_b)s::int[]) AS i(path, title, slug, body, tag_a, tag_b)
), template AS (
    SELECT p.*, b.visible_date, b.author_id FROM wagtailcore_page p JOIN blog_post b ON b.page_ptr_id = p.id
    WHERE p.id = %(template)s
), pages AS (
    INSERT INTO wagtailcore_page (path, depth, numchild, title, slug, live, has_unpublished_changes, url_path,
        seo_title, show_in_menus, search_description, expired, content_type_id, owner_id, locked,
        latest_revision_created_at, first_published_at, last_published_at, draft_title, translation_key, locale_id)
    SELECT i.path, t.depth, 0, i.title, i.slug, true, false,
           (SELECT url_path FROM wagtailcore_page WHERE id = %(blog)s) || i.slug || '/',
           '', false, '', false, t.content_type_id, t.owner_id, false, now(), now(), now(), i.title,
           gen_random_uuid(), t.locale_id
    FROM input i CROSS JOIN template t
    RETURNING id, path, title, slug, url_path, content_type_id, owner_id
), posts AS (
    INSERT INTO blog_post (page_ptr_id, visible_date, body, author_id)
    SELECT p.id, t.visible_date + (p.id %% 3000), i.body, t.author_id
    FROM pages p JOIN input i USING (path) CROSS JOIN template t
), tags AS (
    INSERT INTO blog_posttag (content_object_id, tag_id)
    SELECT p.id, tag FROM pages p JOIN input i USING (path), LATERAL (SELECT DISTINCT unnest(ARRAY[i.tag_a, i.tag_b])) AS x(tag)
), revisions AS (
    INSERT INTO wagtailcore_revision (created_at, content, object_id, user_id, content_type_id, base_content_type_id, object_str)
    SELECT now(),
           r.content || jsonb_build_object('pk', p.id, 'path', p.path, 'title', p.title, 'draft_title', p.title,
                                           'slug', p.slug, 'url_path', p.url_path, 'body', i.body),
           p.id::text, p.owner_id, r.content_type_id, r.base_content_type_id, p.title
    FROM pages p JOIN input i USING (path)
    CROSS JOIN LATERAL (SELECT * FROM wagtailcore_revision WHERE object_id = %(template)s::text
                        ORDER BY id DESC LIMIT 1) r
    RETURNING id, object_id, user_id, content_type_id, object_str
), logs AS (
    INSERT INTO wagtailcore_pagelogentry (label, action, data, timestamp, content_changed, deleted,
        content_type_id, page_id, revision_id, user_id, uuid)
    SELECT rev.object_str, (%(actions)s::text[])[1 + (rev.id + n) %% cardinality(%(actions)s::text[])],
           jsonb_build_object('revision', jsonb_build_object('id', rev.id, 'created', now() - n * interval '1 day'),
                              'title', jsonb_build_object('old', rev.object_str, 'new', rev.object_str),
                              'comment', left(i.body, 200 + (rev.id * n) %% 400)),
           now() - n * interval '1 day', n %% 2 = 0, false, rev.content_type_id, rev.object_id::int, rev.id,
           rev.user_id, gen_random_uuid()
    FROM revisions rev JOIN pages p ON p.id = rev.object_id::int JOIN input i USING (path),
         generate_series(1, %(log_entries)s) AS n
)
UPDATE wagtailcore_page page SET live_revision_id = rev.id, latest_revision_id = rev.id
FROM revisions rev WHERE page.id = rev.object_id::int
"""
