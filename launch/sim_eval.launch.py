"""Evaluate a policy in simulation through ROS: sim_node (MuJoCo, behaves like a ros2_control arm) + policy_node.

    ros2 launch vla_stack sim_eval.launch.py robot:=panda task:=pick policy:=expert
    ros2 launch vla_stack sim_eval.launch.py policy:=/path/to/checkpoint instruction_topic:=task/subtask

instruction_topic:=task/subtask is the planner mode: the policy follows the subtask sequence (published by the
sim's subtask tracker, or by a planner node remapped onto that topic) instead of the whole instruction.

    ros2 launch vla_stack sim_eval.launch.py task:=sort policy:=/path/to/checkpoint planner:=mem

planner:=mem starts planner_node (the MEM high level: subtask + memory text on planner/subtask, planner/memory,
memory reset by the planner_node/reset_memory service) and points the policy at planner/subtask.
"""

from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

CONFIG = "sim_eval.yaml"


def generate_launch_description() -> LaunchDescription:
    config = PathJoinSubstitution([FindPackageShare("vla_stack"), "config", CONFIG])
    arg = LaunchConfiguration
    common = {"robot": arg("robot"), "use_sim_time": arg("use_sim_time")}
    controller = {"controller": arg("controller")}
    cameras = [("front/image_raw", arg("front_camera_topic")), ("wrist/image_raw", arg("wrist_camera_topic"))]
    with_planner = PythonExpression(["'", arg("planner"), "' == 'mem'"])
    instruction = PythonExpression(["'planner/subtask' if '", arg("planner"), "' == 'mem' else '",
                                    arg("instruction_topic"), "'"])
    return LaunchDescription([
        DeclareLaunchArgument("robot", default_value="panda", description="panda or so101"),
        DeclareLaunchArgument("task", default_value="pick", description="pick, place, place_centre, stack, sort or restore"),
        DeclareLaunchArgument("policy", default_value="expert", description="'expert' or a checkpoint path"),
        DeclareLaunchArgument("inference_steps", default_value="0",
                              description="Euler steps per action chunk (0 = the checkpoint's)"),
        DeclareLaunchArgument("controller", default_value="arm_controller",
                              description="joint_trajectory_controller name (<controller>/joint_trajectory)"),
        DeclareLaunchArgument("front_camera_topic", default_value="front/image_raw"),
        DeclareLaunchArgument("wrist_camera_topic", default_value="wrist/image_raw"),
        DeclareLaunchArgument("instruction_topic", default_value="task/instruction",
                              description="task/subtask to follow the subtask sequence (planner mode)"),
        DeclareLaunchArgument("planner", default_value="none",
                              description="none, or mem: the hierarchical MEM planner_node feeds the policy subtasks"),
        DeclareLaunchArgument("planner_checkpoint", default_value="",
                              description="MEM high-level checkpoint ('' = the shipped mem_tiny)"),
        DeclareLaunchArgument("planner_memory", default_value="true",
                              description="false runs the no-memory ablation"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="Stamp with sim time and publish /clock"),
        DeclareLaunchArgument("domain_id", default_value=EnvironmentVariable("ROS_DOMAIN_ID", default_value="0")),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"),
        SetEnvironmentVariable("ROS_DOMAIN_ID", arg("domain_id")),
        Node(package="vla_stack", executable="sim_node", name="sim_node", output="screen",
             parameters=[config, common, controller, {"task": arg("task"), "publish_clock": arg("use_sim_time")}],
             remappings=cameras),
        Node(package="vla_stack", executable="policy_node", name="policy_node", output="screen",
             parameters=[config, common, controller, {"policy": arg("policy"), "autostart": True,
                                                        "inference_steps": arg("inference_steps")}],
             remappings=[*cameras, ("task/instruction", instruction)]),
        Node(package="vla_stack", executable="planner_node", name="planner_node", output="screen",
             parameters=[{"use_sim_time": arg("use_sim_time"), "checkpoint": arg("planner_checkpoint"),
                          "memory": arg("planner_memory")}],
             remappings=cameras[:1], condition=IfCondition(with_planner)),
    ])
