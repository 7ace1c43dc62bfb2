"""Built-in teacher providers."""

from opd_plugins.markers import hookimpl
from opd_plugins.teachers.base import Teacher, TeacherBatch, TeacherScores
from opd_plugins.teachers.blackbox_text import BlackBoxTextTeacher
from opd_plugins.teachers.hf_model import HFModelTeacher
from opd_plugins.teachers.offline_cache import OfflineCacheTeacher
from opd_plugins.teachers.openai_server import OpenAIServerTeacher
from opd_plugins.teachers.router import RouterTeacher
from opd_plugins.teachers.self_context import SelfContextTeacher


@hookimpl
def opd_register_components():
    return [HFModelTeacher, SelfContextTeacher, RouterTeacher, OpenAIServerTeacher, OfflineCacheTeacher,
            BlackBoxTextTeacher]


__all__ = ["Teacher", "TeacherBatch", "TeacherScores", "BlackBoxTextTeacher", "HFModelTeacher", "OfflineCacheTeacher",
           "OpenAIServerTeacher", "RouterTeacher", "SelfContextTeacher"]
