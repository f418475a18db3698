"""The example site's blog: a Blog index with Post children, and (from migration 0002
on) a Podcast, which *is a* Blog with iTunes fields.

Because Podcast inherits from Blog through multi-table inheritance, an existing Blog page
cannot become a Podcast by a migration: the Podcast page has to be created beside it,
the posts moved under it, and the old Blog deleted. That is the runbook's notebook step.
"""
from django.conf import settings
from django.db import models
from modelcluster.contrib.taggit import ClusterTaggableManager
from modelcluster.fields import ParentalKey
from taggit.models import TaggedItemBase
from wagtail.admin.panels import FieldPanel
from wagtail.fields import RichTextField
from wagtail.models import Page


class Blog(Page):
    description = RichTextField(blank=True)

    content_panels = Page.content_panels + [FieldPanel("description")]
    subpage_types = ["blog.Post"]


class PostTag(TaggedItemBase):
    content_object = ParentalKey("blog.Post", related_name="tagged_items", on_delete=models.CASCADE)


class Post(Page):
    visible_date = models.DateField("date")
    body = RichTextField(blank=True)
    tags = ClusterTaggableManager(through=PostTag, blank=True)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    content_panels = Page.content_panels + [
        FieldPanel("visible_date"),
        FieldPanel("body"),
        FieldPanel("tags"),
        FieldPanel("author"),
    ]
    parent_page_types = ["blog.Blog", "blog.Podcast"]
    subpage_types: list[str] = []

    class Meta:
        indexes = [models.Index(fields=["visible_date"], name="blog_post_visible_date")]


class Podcast(Blog):
    itunes_artwork = models.ForeignKey(
        "wagtailimages.Image", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    itunes_categories = models.CharField(max_length=255, blank=True)
    keywords = models.CharField(max_length=255, blank=True)
    explicit = models.BooleanField(default=False)

    content_panels = Blog.content_panels + [
        FieldPanel("itunes_artwork"),
        FieldPanel("itunes_categories"),
        FieldPanel("keywords"),
        FieldPanel("explicit"),
    ]
    subpage_types = ["blog.Post"]
