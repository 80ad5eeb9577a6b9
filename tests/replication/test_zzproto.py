from pathlib import Path
import json, time
import trio, trio.testing
from trionode.testing import open_cluster
from trionode.context.replication import topic_for

APPS = Path("/work/main/apps")


async def test_p(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    t0 = time.perf_counter()
    with trio.fail_after(120):
        async with open_cluster(3, tmp_path) as cluster:
            print("start", time.perf_counter() - t0)
            a, b, c = cluster.nodes
            for n in cluster:
                rec = await n.applications.install(str(APPS / "chat"))
            print("install", time.perf_counter() - t0)
            ctx = (await a.contexts.create(rec.application_id)).context_id
            for n in (b, c):
                text = await a.joins.invite(ctx)
                await n.joins.join(text)
            print("join", time.perf_counter() - t0, trio.current_time())
            await cluster.wait_mesh(topic_for(ctx))
            print("mesh", time.perf_counter() - t0, trio.current_time())
            r = await a.contexts.execute(ctx, "post", json.dumps({"text": "hi"}))
            await cluster.settle()
            print([await n.contexts.state(ctx) for n in cluster])
            print("post", time.perf_counter() - t0, trio.current_time())
            t1 = time.perf_counter()
            for i in range(200):
                await a.contexts.execute(ctx, "post", json.dumps({"text": f"m{i}"}))
            await cluster.settle()
            print("200 posts", time.perf_counter() - t1)
            print([await n.contexts.state(ctx) for n in cluster])
        print("stop", time.perf_counter() - t0)
