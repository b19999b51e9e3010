from gevent import monkey; monkey.patch_all()
import sys, time, logging, gevent
sys.path.insert(0, "/tmp/probe-embed")
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
from emq_green.jobmanager import JobManager
from emq_green.records import State
from emq_green.settings import load_settings
from emq_green.client import Client, JobError, ResultTimeout
from app import state
BACK, FRONT = sys.argv[1], sys.argv[2]
# EventMQ-style constructor + jobmanager_main in a greenlet
m = JobManager(name="legacy-1", queues=["default", "email:20"], concurrent_jobs=7, skip_signal=True)
g = gevent.spawn(m.jobmanager_main, BACK)
print("running", m.wait_for_state(State.RUNNING, 10), m.name, m.queues, m.concurrent_jobs)
c = Client(FRONT)
t0=time.time()
print("defer plain ->", c.defer_job("app.jobs.bump", [2]))
print("defer email ->", c.defer_job("app.jobs.bump", [3], queue="email", reply_requested=True))
gevent.sleep(1); print("COUNTER", state.COUNTER)
h = c.defer_job("app.jobs.bump", [1], result=True)
try: print(h.get(timeout=3))
except ResultTimeout as e: print("result with eventmq router -> ResultTimeout (doc)", e)
t0=time.time()
try: print("guarantee ->", c.defer_job("app.jobs.bump", [10], guarantee=True), round(time.time()-t0,2))
except Exception as e: print("guarantee ->", type(e).__name__, e, round(time.time()-t0,2))
gevent.sleep(1); print("COUNTER", state.COUNTER)
print("stop", m.stop(timeout=30), "greenlet done", g.ready(), g.exception)
c.close()
